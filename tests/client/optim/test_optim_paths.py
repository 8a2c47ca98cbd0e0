"""The code paths and what makes a step GPU-friendly: the fused Triton kernels (under Triton's
interpreter on CPU), path selection, the on-device skip counter, ``capturable`` and ``torch.compile``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optim_helpers import make_problem, max_rel_err, run
from optim_reference import lamb_reference, lans_reference
from test_optim_reference import LAMB_CONFIGS, LANS_CONFIGS

from largebatch.client.optim import LAMB, LANS, LARS, RecipeLR
from largebatch.client.optim import _fused as fused_module
from largebatch.client.optim._core import pick_path

FUSED_CASES = [(LAMB, c) for c in LAMB_CONFIGS] + [(LANS, c) for c in LANS_CONFIGS]


def _fused_needed():
    if not fused_module.fused_available(torch.device("cpu")):
        pytest.skip("the fused path needs Triton's interpreter on CPU (pip install triton)")


@pytest.mark.parametrize(("cls", "config"), FUSED_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_fused_equals_foreach_in_float32(cls, config):
    """The Triton kernels (pass 1: moments and norms with atomic adds; pass 2: the scaled update) give
    the foreach path's result within 1e-6 relative, on the reference problem's tensors."""
    _fused_needed()
    kwargs, no_decay, _ = (LAMB_CONFIGS if cls is LAMB else LANS_CONFIGS)[config]
    pb = make_problem(torch.float32, steps=6, zero_grad_steps=2 if cls is LANS else 0)
    out = {}
    for name, path in (("foreach", dict(fused=False)), ("fused", dict(fused=True))):
        params = pb.params(torch.float32)
        opt = cls(pb.groups(params, **no_decay), lr=0.0, **kwargs, **path)
        run(opt, params, pb)
        out[name] = params
    assert max_rel_err(out["fused"], [p.detach().double().numpy() for p in out["foreach"]]) < 1e-6


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_fused_bf16_parameters_round_like_torch(cls):
    """bf16 parameters: fp32 math, one round-to-nearest-even store; the same bits as the foreach path
    on almost every element (the two paths' fp32 update can differ in its last bit)."""
    _fused_needed()
    pb = make_problem(torch.bfloat16, steps=4)
    out = {}
    for name, path in (("foreach", dict(fused=False)), ("fused", dict(fused=True))):
        params = pb.params(torch.bfloat16)
        run(cls(pb.groups(params), lr=0.0, **path), params, pb)
        out[name] = params
    for a, b in zip(out["fused"], out["foreach"], strict=True):
        assert (a != b).float().mean() < 0.01
        assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max()


@pytest.mark.slow  # a real Triton compile: seconds
def test_kernels_compile_for_an_h100_without_a_gpu(tmp_path):
    """The interpreter never compiles the kernels: compile every kernel, fp32/bf16/fp64, to PTX and a
    cubin for sm_90 (Triton's compiler and ptxas run without a GPU), fp32 with correctly rounded
    division and square root."""
    if fused_module.triton is None:
        pytest.skip("Triton is not installed")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).with_name("compile_kernels.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 15
    for line in lines:
        if "sumsq" not in line and "fp64" not in line:
            assert "div.rn True, sqrt.rn True" in line, line


def test_path_selection_follows_torch():
    cpu = [torch.zeros(3)]
    with fused_module.cpu_backend("triton"):  # the interpreter is a test tool: never the default
        assert pick_path(None, None, cpu) == "foreach"
    assert pick_path(False, None, cpu) == "single"
    assert pick_path(None, False, cpu) == "foreach"
    with pytest.raises(ValueError, match="fused=True needs the multi-tensor path"):
        pick_path(False, True, cpu)


def test_fused_true_on_cpu_without_a_compiler_is_a_clear_error(monkeypatch, tmp_path):
    """On CPU (no interpreter) ``fused=True`` runs the C kernels; where they cannot be built the step
    says why and changes nothing."""
    from largebatch.client.optim import _cpu_fused

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path))
    with fused_module.cpu_backend("c"):
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        with pytest.raises(RuntimeError, match=r"fused=True cannot run on cpu tensors: no C compiler found"):
            LAMB([p], lr=0.1, fused=True).step()
        monkeypatch.setenv("CC", "false")  # a compiler that fails
        with pytest.raises(RuntimeError, match=r"compiling the CPU kernels with .*false failed"):
            LANS([p], lr=0.1, fused=True).step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    _cpu_fused._build.cache_clear()


def test_the_default_on_cpu_is_the_c_kernels():
    """``fused=None`` (what ``LAMB(...)``, ``LANS(...)`` and ``build()`` use): the C kernels on CPU for
    the dtypes they have, the same bits as ``fused=True``; the foreach path for the others."""
    with _c_kernels():
        assert pick_path(None, None, [torch.zeros(3)]) == "fused"
        assert pick_path(None, None, [torch.zeros(3, dtype=torch.float64)]) == "fused"
        assert pick_path(None, None, [torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)]) == "foreach"
        assert pick_path(None, False, [torch.zeros(3)]) == "foreach"
        pb = make_problem(torch.float32, steps=4)
        for cls in (LAMB, LANS):
            out = {}
            for name, path in (("default", {}), ("fused", dict(fused=True))):
                params = pb.params(torch.float32)
                run(cls(pb.groups(params), lr=0.0, **path), params, pb)
                out[name] = params
            for a, b in zip(out["default"], out["fused"], strict=True):
                assert torch.equal(a, b)


def test_the_default_without_a_compiler_falls_back_with_one_log_line(monkeypatch, tmp_path, caplog):
    from largebatch.client.optim import _cpu_fused, _paths

    monkeypatch.setenv("LARGEBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    _paths._fall_back.cache_clear()
    pb = make_problem(torch.float32, steps=3)
    out = {}
    try:
        with fused_module.cpu_backend("c"), caplog.at_level("WARNING", logger="largebatch.client.optim"):
            for name, path in (("default", {}), ("foreach", dict(fused=False))):
                params = pb.params(torch.float32)
                run(LANS(pb.groups(params), lr=0.0, **path), params, pb)
                out[name] = params
    finally:
        _cpu_fused._build.cache_clear()
        _paths._fall_back.cache_clear()
    lines = [r.getMessage() for r in caplog.records if r.name == "largebatch.client.optim"]
    assert len(lines) == 1 and "no C compiler found" in lines[0] and "foreach path" in lines[0], lines
    for a, b in zip(out["default"], out["foreach"], strict=True):
        assert torch.equal(a, b)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fused_module, "_INTERPRETED", False)
    with fused_module.cpu_backend("triton"):
        why = fused_module.fused_unavailable_reason(torch.device("cpu"))
    assert why is not None and ("Triton is not installed" in why or "only under Triton's interpreter" in why)
    with pytest.raises(ValueError, match="Invalid cpu_backend: 'cuda'"):
        with fused_module.cpu_backend("cuda"):
            pass


def _c_kernels():
    from largebatch.client.optim import _cpu_fused

    reason = _cpu_fused.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernels cannot be built here: {reason}")
    return fused_module.cpu_backend("c")


@pytest.mark.parametrize(("cls", "config"), FUSED_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_cpu_kernels_equal_foreach_in_float32(cls, config):
    """The C kernels (fp32 math, per-block float64 sums) give the foreach path's result within 1e-6."""
    kwargs, no_decay, _ = (LAMB_CONFIGS if cls is LAMB else LANS_CONFIGS)[config]
    pb = make_problem(torch.float32, steps=6, zero_grad_steps=2 if cls is LANS else 0)
    out = {}
    with _c_kernels():
        for name, path in (("foreach", dict(fused=False)), ("c", dict(fused=True))):
            params = pb.params(torch.float32)
            run(cls(pb.groups(params, **no_decay), lr=0.0, **kwargs, **path), params, pb)
            out[name] = params
    assert max_rel_err(out["c"], [p.detach().double().numpy() for p in out["foreach"]]) < 1e-6


# Several blocks, a ragged last block, a tiny tensor. At 3 threads the first set's largest tensor is more
# than a thread's share (the two-call driver); the second's batches go whole to the threads (one call).
_THREAD_SHAPES = {
    "two calls": [(300, 200), (70_000,), (7,)],
    "one call": [(300, 200), (250, 250), (70_000,), (400, 150), (7,), (400, 300), (200, 200)],
}


def _c_steps(cls, shapes: list[tuple[int, ...]], runs: list[tuple[int, int]], monkeypatch) -> dict:
    """The parameters after three C-kernel steps from the same gradients, per (threads, keep limit)."""
    from largebatch.client.optim import _cpu_fused

    torch.manual_seed(0)
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    out = {}
    before = torch.get_num_threads()
    try:
        with _c_kernels():
            for threads, keep in runs:
                torch.set_num_threads(threads)
                monkeypatch.setattr(_cpu_fused, "_KEEP", keep)
                params = [torch.nn.Parameter(torch.ones(s) * 0.5) for s in shapes]
                opt = cls(params, lr=0.01, weight_decay=0.01, fused=True)
                for gs in grads:
                    for p, g in zip(params, gs, strict=True):
                        p.grad = g.clone()
                    opt.step()
                out[threads, keep] = (_cpu_fused._one_call(_cpu_fused._numels(params)),
                                      [p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(before)
    return out


def _same_bits(out: dict) -> bool:
    first = next(iter(out.values()))[1]
    return all(all(torch.equal(a, b) for a, b in zip(first, params, strict=True)) for _, params in out.values())


@pytest.mark.parametrize("driver", list(_THREAD_SHAPES))
@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_cpu_kernels_do_not_depend_on_the_thread_count(cls, driver, monkeypatch):
    """Each block's sums are kept apart and added in block order: 1 or 3 threads, the same bits."""
    from largebatch.client.optim import _cpu_fused

    out = _c_steps(cls, _THREAD_SHAPES[driver], [(1, _cpu_fused._KEEP), (3, _cpu_fused._KEEP)], monkeypatch)
    assert out[3, _cpu_fused._KEEP][0] == (driver == "one call")
    assert _same_bits(out)


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_cpu_kernels_kept_updates_give_the_same_bits(cls, monkeypatch):
    """Pass 2 from the updates pass 1 kept equals pass 2 recomputing them, bit for bit: keeping off, on
    for every batch, and on for one of the two batches (160,000 elements kept, 252,507 recomputed)."""
    out = _c_steps(cls, _THREAD_SHAPES["one call"], [(t, k) for t in (1, 2) for k in (0, 1 << 22, 200_000)],
                   monkeypatch)
    assert all(one_call for one_call, _ in out.values())
    assert _same_bits(out)


@pytest.mark.parametrize("cls", [LAMB, LANS])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(numels=st.lists(st.integers(1, 90_000), min_size=1, max_size=9), threads=st.integers(1, 3),
       keep=st.integers(0, 500_000))
def test_cpu_kernels_kept_updates_give_the_same_bits_for_any_shapes(cls, numels, threads, keep, monkeypatch):
    """Whatever the tensor sizes (blocks split anywhere, tails shorter than a block), the thread count
    and the keep limit (a batch kept or recomputed wherever the limit falls), the bits are the ones of
    one thread recomputing every update."""
    shapes = [(n,) for n in numels]
    assert _same_bits(_c_steps(cls, shapes, [(1, 0), (threads, keep), (threads, 1 << 22)], monkeypatch))


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_cpu_kernels_leave_bf16_to_the_reference_path(cls):
    """The C kernels take fp32 and fp64; bf16 parameters go through the reference loop, same result."""
    pb = make_problem(torch.bfloat16, steps=3)
    out = {}
    with _c_kernels():
        for name, path in (("single", dict(foreach=False)), ("c", dict(fused=True))):
            params = pb.params(torch.bfloat16)
            run(cls(pb.groups(params), lr=0.0, **path), params, pb)
            out[name] = params
    assert all(torch.equal(a, b) for a, b in zip(out["c"], out["single"], strict=True))


@pytest.mark.parametrize(("cls", "reference", "config"),
                         [(LAMB, lamb_reference, "apex"), (LAMB, lamb_reference, "no_bias_correction"),
                          (LANS, lans_reference, "paper")])
def test_foreach_ops_without_torchs_fused_adam(cls, reference, config):
    """The foreach path's own moment update (used where torch's fused Adam kernel is not: other
    devices, and while ``torch.compile`` traces) against the float64 reference."""
    kwargs, no_decay, ref_kwargs = (LAMB_CONFIGS if cls is LAMB else LANS_CONFIGS)[config]
    pb = make_problem(torch.float64, steps=8)
    params = pb.params(torch.float64)
    opt = cls(pb.groups(params, **no_decay), lr=0.0, **kwargs, fused=False)
    opt._torch_fused_adam = False
    run(opt, params, pb)
    expected = reference(pb.x0, pb.grads, pb.lrs, beta1=0.9, beta2=0.999, eps=1e-6, wd=pb.wd(), **ref_kwargs(pb))
    assert max_rel_err(params, expected) < 1e-12


# -- the skip counter ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LAMB, LANS, LARS])
def test_skip_is_the_default_and_the_counter_is_one_device_tensor(cls):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = cls([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    counter = opt.skip_counter
    assert opt.defaults["nonfinite"] == "skip"
    assert isinstance(counter, torch.Tensor) and counter.dtype == torch.int64 and counter.device == a.device
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, math.inf])
    opt.step()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert opt.skip_counter is counter and int(counter) == 1 and opt.skipped_steps == 1
    assert all(g["skipped_steps"] is counter for g in opt.param_groups)
    assert float(opt.state[a]["step"]) == 1


# -- capturable and torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [LAMB, LANS, LARS])
def test_capturable_keeps_lr_on_the_device_and_schedulers_update_it_in_place(cls):
    pb = make_problem(torch.float32, steps=5)
    results = []
    for capturable in (False, True):
        params = pb.params(torch.float32)
        opt = cls(pb.groups(params), lr=0.05, capturable=capturable)
        lr_before = opt.param_groups[0]["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for t in range(5):
            for p, g in zip(params, pb.grads[t], strict=True):
                p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
            sched.step()
        if capturable:
            lr = opt.param_groups[0]["lr"]
            assert isinstance(lr, torch.Tensor) and lr is lr_before  # updated in place: a graph sees it
            assert lr.device == params[0].device and float(lr) == pytest.approx(0.05 / 6)
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_capturable_lr_survives_a_checkpoint_and_recipe_lr():
    from test_optim_build import make_recipe

    p = torch.nn.Parameter(torch.ones(3))
    opt = LAMB([p], lr=0.1, capturable=True)
    q = torch.nn.Parameter(torch.ones(3))
    fresh = LAMB([q], lr=0.1, capturable=True)
    fresh.load_state_dict(opt.state_dict())
    lr = fresh.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    sched = RecipeLR(fresh, make_recipe())
    for _ in range(4):
        q.grad = torch.ones(3)
        fresh.step()
        sched.step()
    saved = sched.state_dict()
    sched.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] is lr  # RecipeLR writes into the tensor, never replaces it
    assert float(lr) == pytest.approx(sched.get_last_lr()[0])


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("cls", [LAMB, LANS, LARS])
def test_step_traces_into_one_graph(cls, capturable):
    """``torch.compile(opt.step, fullgraph=True)`` works: dynamo sees no graph break (a full compile
    takes ~30 s on 2 cores; scripts/gpu_check.sh compiles and runs it on CUDA)."""
    import torch._dynamo

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    kwargs = {"max_grad_norm": 1.0} if cls is LAMB else {}
    opt = cls(model.parameters(), lr=0.01, capturable=capturable, **kwargs)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()  # state creation happens once, outside the steady state
    torch._dynamo.reset()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
