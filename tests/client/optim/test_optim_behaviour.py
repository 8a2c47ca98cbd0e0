"""Non-finite gradients, untouched ``p.grad``, bf16 parameters, state_dict round trips, validation."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from optim_helpers import PATHS, make_problem, run
from optim_reference import lamb_reference

from largebatch.client.optim import (
    LAMB,
    LANS,
    LARS,
    NonFiniteGradientError,
    lamb,
    lans,
    lars,
    param_groups_for,
)

OPTIMIZERS = {
    "lamb": (LAMB, {}),
    "lamb-apex": (LAMB, {"max_grad_norm": 1.0, "skip_adaptation_without_decay": True}),
    "lans": (LANS, {}),
    "lars": (LARS, {"weight_decay": 0.01}),
}


def paths_for(cls):
    return ["single", "foreach"] if cls is LARS else list(PATHS)


CASES = [(name, path) for name, (cls, _) in OPTIMIZERS.items() for path in paths_for(cls)]


def make(name, path, params_or_groups, **extra):
    cls, kwargs = OPTIMIZERS[name]
    path_kwargs = {k: v for k, v in PATHS[path].items() if not (cls is LARS and k == "fused")}
    return cls(params_or_groups, lr=0.02, **kwargs, **path_kwargs, **extra)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare tensors bit for bit, NaN included."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"] or _groups_equal(a["param_groups"], b["param_groups"])
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, value in a["state"][k].items():
            assert torch.equal(bits(value), bits(b["state"][k][key])), (k, key)


def _groups_equal(x, y) -> bool:
    for gx, gy in zip(x, y, strict=True):
        for key in gx:
            vx, vy = gx[key], gy[key]
            same = torch.equal(vx, vy) if isinstance(vx, torch.Tensor) else vx == vy
            if not same:
                return False
    return True


# -- non-finite gradients -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), CASES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_raises_before_anything_changes(name, path, bad):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make(name, path, param_groups_for(model, 0.01), nonfinite="raise")
    x = torch.randn(5, 4)
    for step in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        if step == 2:
            model[0].weight.grad[1, 2] = bad
        params_before = [bits(p) for p in model.parameters()]
        grads_before = [bits(p.grad) for p in model.parameters()]
        state_before = snapshot(opt)
        if step < 2:
            opt.step()
            continue
        with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient .* in 0\.weight \(3, 4\); no parameter"):
            opt.step()
        assert all(torch.equal(a, bits(p)) for a, p in zip(params_before, model.parameters(), strict=True))
        assert all(torch.equal(a, bits(p.grad)) for a, p in zip(grads_before, model.parameters(), strict=True))
        assert_same_state(state_before, snapshot(opt))


def test_nonfinite_on_the_first_step_creates_no_state():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    opt = LAMB([p], lr=0.1, nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"group 0, parameter 0 \(3,\)"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize(("name", "path"), CASES)
def test_skip_mode_equals_a_run_without_the_bad_steps(name, path):
    """Skipped steps (NaN on the first step, NaN later, Inf later) leave parameters and state bit-identical."""
    pb = make_problem(torch.float32, steps=10)
    bad_steps = {0: math.nan, 4: math.nan, 7: math.inf}
    poisoned = copy.deepcopy(pb)
    for t, value in bad_steps.items():
        poisoned.grads[t][1] = poisoned.grads[t][1].copy()
        poisoned.grads[t][1][3, 5] = value
    clean = copy.deepcopy(pb)
    keep = [t for t in range(10) if t not in bad_steps]
    clean.grads = [pb.grads[t] for t in keep]
    clean.lrs = [pb.lrs[t] for t in keep]

    params_a = poisoned.params(torch.float32)
    opt_a = make(name, path, poisoned.groups(params_a), nonfinite="skip")
    run(opt_a, params_a, poisoned)
    params_b = clean.params(torch.float32)
    opt_b = make(name, path, clean.groups(params_b), nonfinite="skip")
    run(opt_b, params_b, clean)

    assert opt_a.skipped_steps == 3 and opt_b.skipped_steps == 0
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for k in state_a:
        for key in state_a[k]:
            assert torch.equal(state_a[k][key], state_b[k][key]), (k, key)
    assert float(state_a[0]["step"]) == len(keep)


def test_skip_counter_is_saved_in_the_state_dict():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([p], lr=0.1, nonfinite="skip")
    p.grad = torch.tensor([math.inf, 0.0, 0.0])
    opt.step()
    saved = opt.state_dict()
    fresh = LAMB([torch.nn.Parameter(torch.ones(3))], lr=0.1, nonfinite="skip")
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1


def test_groups_must_agree_on_nonfinite_mode():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt = LAMB([{"params": [a]}, {"params": [b], "nonfinite": "raise"}], lr=0.1)
    with pytest.raises(ValueError, match=r"same nonfinite mode, got \['raise', 'skip'\]"):
        opt.step()


# -- p.grad is never modified ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_are_not_modified(name, path, dtype):
    pb = make_problem(torch.float32, steps=3)
    params = [p.detach().to(dtype).requires_grad_() for p in pb.params(torch.float32)]
    opt = make(name, path, pb.groups(params))
    for t in range(3):
        for p, g in zip(params, pb.grads[t], strict=True):
            p.grad = torch.tensor(g).to(dtype) * 10  # large: global clipping is active
        before = [bits(p.grad) for p in params]
        opt.step()
        assert all(torch.equal(b, bits(p.grad)) for b, p in zip(before, params, strict=True))


# -- bf16 parameters --------------------------------------------------------------------------------


def _bf16_round(values: list[np.ndarray]) -> list[np.ndarray]:
    return [torch.tensor(v).to(torch.bfloat16).to(torch.float64).numpy() for v in values]


@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_parameters_keep_fp32_state_and_follow_the_reference(path):
    pb = make_problem(torch.bfloat16, steps=20)
    params = pb.params(torch.bfloat16)
    opt = LAMB(pb.groups(params), lr=0.0, **PATHS[path])
    run(opt, params, pb)
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    # the reference, storing x in bf16 after every step (moments stay exact)
    x = [a.copy() for a in pb.x0]
    state = None
    for t in range(20):
        sub = type(pb)(x, [pb.grads[t]], [pb.lrs[t]], pb.decay)
        x, state = _lamb_one_step(sub, t + 1, state)
        x = _bf16_round(x)
    for p, e in zip(params, x, strict=True):
        got = p.detach().to(torch.float64).numpy()
        # at most one bf16 rounding step apart, on a handful of elements
        assert np.max(np.abs(got - e)) <= 2**-7 * max(np.max(np.abs(e)), 1e-30)
        assert np.mean(got != e) < 0.02


def _lamb_one_step(pb, t, state):
    """One LAMB step of the float64 reference at step number ``t`` (moments carried in ``state``)."""
    b1, b2, eps = 0.9, 0.999, 1e-6
    wd = pb.wd()
    if state is None:
        state = ([np.zeros_like(a) for a in pb.x0], [np.zeros_like(a) for a in pb.x0])
    m, v = state
    out = []
    for i, (x, g) in enumerate(zip(pb.x0, pb.grads[0], strict=True)):
        m[i] = b1 * m[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        u = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps) + wd[i] * x
        xn, un = np.linalg.norm(x), np.linalg.norm(u)
        ratio = xn / un if xn > 0 and un > 0 else 1.0
        out.append(x - pb.lrs[0] * ratio * u)
    return out, (m, v)


def test_reference_one_step_helper_agrees_with_the_full_reference():
    pb = make_problem(torch.float64, steps=3)
    x, state = pb.x0, None
    for t in range(3):
        x, state = _lamb_one_step(type(pb)(x, [pb.grads[t]], [pb.lrs[t]], pb.decay), t + 1, state)
    full = lamb_reference(pb.x0, pb.grads, pb.lrs, beta1=0.9, beta2=0.999, eps=1e-6, wd=pb.wd(), adapt=[True] * 5)
    for a, b in zip(x, full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# -- state_dict -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resume_from_state_dict_is_bit_identical(name, path, dtype):
    pb = make_problem(torch.float32, steps=12)
    cast = type(pb)([torch.tensor(a).to(dtype).double().numpy() for a in pb.x0], pb.grads, pb.lrs, pb.decay)
    params = cast.params(dtype)
    opt = make(name, path, cast.groups(params))
    run(opt, params, cast, steps=6)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    run(opt, params, cast, steps=6, start=6)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(t) for t in ckpt["params"]]
    # built with different hyperparameters: the checkpoint's must win
    other = make(name, path, cast.groups(resumed))
    for group in other.param_groups:
        group.update({k: v for k, v in {"eps": 0.5, "weight_decay": 0.3}.items() if k in group})
    other.load_state_dict(ckpt["opt"])
    for p in resumed:
        for key, value in other.state[p].items():
            assert value.dtype == torch.float32, key  # fp32 moments survive the load
    run(other, resumed, cast, steps=6, start=6)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)


def test_everything_that_changes_the_math_is_in_param_groups():
    p = torch.nn.Parameter(torch.ones(2))
    opt = LAMB([p], lr=0.1, betas=(0.8, 0.9), eps=1e-5, weight_decay=0.2, bias_correction=False,
               layer_adaptation=False, phi_bounds=(0.1, 5.0), max_grad_norm=2.0, skip_adaptation_without_decay=True,
               nonfinite="skip")
    group = opt.state_dict()["param_groups"][0]
    assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-5 and group["weight_decay"] == 0.2
    assert group["bias_correction"] is False and group["layer_adaptation"] is False
    assert group["phi_bounds"] == (0.1, 5.0) and group["max_grad_norm"] == 2.0
    assert group["skip_adaptation_without_decay"] is True and group["nonfinite"] == "skip"
    lans_group = LANS([p], lr=0.1).state_dict()["param_groups"][0]
    assert {"betas", "eps", "weight_decay", "bias_correction", "layer_adaptation", "phi_bounds"} <= set(lans_group)
    lars_group = LARS([p], lr=0.1).state_dict()["param_groups"][0]
    assert {"momentum", "weight_decay", "trust_coefficient", "eps", "layer_adaptation", "phi_bounds"} <= set(lars_group)


def test_step_counters_are_tensors_per_parameter():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = LAMB([p, q], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    q.grad = torch.ones(3)
    opt.step()
    assert isinstance(opt.state[p]["step"], torch.Tensor) and opt.state[p]["step"].dim() == 0
    assert float(opt.state[p]["step"]) == 2 and float(opt.state[q]["step"]) == 1


# -- the functional forms ---------------------------------------------------------------------------


def test_functional_forms_equal_the_classes():
    pb = make_problem(torch.float64, steps=5)
    for cls, fn, keys in [(LAMB, lamb, ("exp_avg", "exp_avg_sq")), (LANS, lans, ("exp_avg", "exp_avg_sq")),
                          (LARS, lars, ("momentum_buffer",))]:
        params = pb.params(torch.float64)
        opt = cls(params, lr=0.0, weight_decay=0.01)
        run(opt, params, pb)
        xs = [torch.tensor(a) for a in pb.x0]
        bufs = [[torch.zeros_like(x) for x in xs] for _ in keys]
        steps = [torch.zeros((), dtype=torch.float32) for _ in xs]
        for t in range(5):
            grads = [torch.tensor(g) for g in pb.grads[t]]
            if cls is LARS:
                fn(xs, grads, *bufs, steps, lr=pb.lrs[t], momentum=0.9, weight_decay=0.01)
            else:
                fn(xs, grads, *bufs, steps, lr=pb.lrs[t], beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)
        for a, b in zip(params, xs, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-13, atol=1e-15)


def test_functional_skip_mode_returns_the_flag():
    x = [torch.ones(3)]
    m, v, s = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(())]
    ok = lamb(x, [torch.tensor([math.nan, 1.0, 1.0])], m, v, s, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6,
              weight_decay=0.0, nonfinite="skip")
    assert ok is not None and not bool(ok)
    assert torch.equal(x[0], torch.ones(3)) and float(s[0]) == 0


# -- validation ---------------------------------------------------------------------------------------


def _p():
    return [torch.nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: LAMB(_p(), lr=-1.0), "Invalid learning rate: -1.0"),
        (lambda: LAMB(_p(), lr=math.nan), "Invalid learning rate: nan"),
        (lambda: LAMB(_p(), lr=0.1, betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (lambda: LAMB(_p(), lr=0.1, betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (lambda: LAMB(_p(), lr=0.1, eps=-1e-8), "Invalid epsilon value: -1e-08"),
        (lambda: LAMB(_p(), lr=0.1, weight_decay=-0.01), "Invalid weight_decay value: -0.01"),
        (lambda: LAMB(_p(), lr=0.1, max_grad_norm=0.0), "Invalid max_grad_norm value: 0.0 (expected None or a number > 0)"),
        (lambda: LAMB(_p(), lr=0.1, phi_bounds=(2.0, 1.0)), "Invalid phi_bounds: (2.0, 1.0)"),
        (lambda: LAMB(_p(), lr=0.1, nonfinite="ignore"), "Invalid nonfinite mode: 'ignore' (expected 'raise' or 'skip')"),
        (lambda: LAMB(_p(), lr=0.1, bias_correction=1), "Invalid bias_correction value: 1 (expected True or False)"),
        (lambda: LAMB(_p(), lr=0.1, foreach=False, fused=True),
         "fused=True needs the multi-tensor path; it cannot be combined with foreach=False"),
        (lambda: LAMB([{"params": _p(), "lr": -2.0}], lr=0.1), "Invalid learning rate: -2.0"),
        (lambda: LANS(_p(), lr=0.1, betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
        (lambda: LARS(_p(), lr=0.1, momentum=1.0), "Invalid momentum value: 1.0"),
        (lambda: LARS(_p(), lr=0.1, trust_coefficient=0.0), "Invalid trust_coefficient value: 0.0"),
    ],
)
def test_invalid_arguments_are_named(factory, message):
    with pytest.raises(ValueError) as info:
        factory()
    assert str(info.value).startswith(message)


def test_sparse_gradients_are_refused():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="LAMB does not support sparse gradients"):
        LAMB([p], lr=0.1).step()


# -- no host synchronisation ----------------------------------------------------------------------------

SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero")


def _sync_counts(opt, params) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state creation is not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return {e.key: e.count for e in prof.key_averages() if e.key in SYNC_OPS}


@pytest.mark.parametrize(("name", "path"), [c for c in CASES if c[1] not in ("fused", "cpu_kernel")])
def test_default_step_reads_nothing_back_from_the_device(name, path):
    """No ``.item()``, ``bool(tensor)`` or index built on the host inside ``step()`` with the defaults.

    (The foreach path on CUDA gets its moments from torch's fused Adam kernel; on CPU that kernel reads
    each step counter on the host, which is no device sync but would be counted here, so this test
    uses the foreach ops. The fused path runs under Triton's interpreter here: ``scripts/gpu_check.sh``
    checks it on CUDA with ``torch.cuda.set_sync_debug_mode("error")``. The C kernels run on CPU only,
    where reading a scalar is no synchronisation: they read the skip decision and the clip factor.)"""
    params = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(20))]
    opt = make(name, path, params)
    assert opt.defaults["nonfinite"] == "skip"
    opt._torch_fused_adam = False
    assert _sync_counts(opt, params) == {}


def test_foreach_path_on_cpu_reads_back_only_what_torchs_cpu_kernel_reads():
    params = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(20))]
    counts = _sync_counts(LAMB(params, lr=0.1, fused=False), params)
    assert counts.get("aten::is_nonzero", 0) == 0
    assert counts.get("aten::_local_scalar_dense", 0) <= len(params)


def test_raise_mode_has_exactly_one_host_sync():
    params = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(20))]
    assert _sync_counts(LAMB(params, lr=0.1, foreach=False, nonfinite="raise"), params) == {
        "aten::_local_scalar_dense": 1, "aten::is_nonzero": 1}


def test_complex_and_integer_parameters_are_refused():
    with pytest.raises(ValueError, match=r"LAMB does not support complex parameters \(got torch.complex64\)"):
        LAMB([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"LARS needs floating-point parameters \(got torch.int64\)"):
        LARS([torch.zeros(2, dtype=torch.int64)], lr=0.1)


def test_layer_norms_are_accurate_on_large_fp32_tensors():
    """The trust ratio's norms: fp32 tensors of millions of elements, within 1e-6 of float64."""
    from largebatch.client.optim._core import sq_norms

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * 0.02 + 0.01 for n in (3, 4096, 20_000, 4_000_037)]
    exact = torch.stack([t.double().square().sum() for t in tensors])
    assert ((sq_norms(tensors) - exact).abs() / exact).max() < 1e-6
