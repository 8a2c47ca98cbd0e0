"""LAMB, LANS and LARS against float64 references written from the papers' pseudo-code.

20 steps on a zero-initialised tensor, a 1-element tensor, a bias without weight decay and a
131072-element matrix, with a learning rate that changes every step: float64 within 1e-12 and float32
within 1e-6 (relative to each tensor's scale), on every code path.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from optim_helpers import PATHS, make_problem, max_rel_err, run
from optim_reference import lamb_reference, lans_reference, lars_reference

from largebatch.client.optim import LAMB, LANS, LARS

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
DTYPES = [torch.float64, torch.float32]
B1, B2, EPS = 0.9, 0.999, 1e-6

LAMB_CONFIGS = {
    # name: (constructor kwargs, options of the no-decay group, reference kwargs given the problem)
    "paper": ({}, {}, lambda pb: dict(adapt=[True] * 5)),
    "excluded": ({}, {"layer_adaptation": False}, lambda pb: dict(adapt=pb.decay)),
    "apex": ({"max_grad_norm": 1.0, "skip_adaptation_without_decay": True}, {},
             lambda pb: dict(adapt=pb.decay, max_grad_norm=1.0)),
    "no_bias_correction": ({"bias_correction": False}, {}, lambda pb: dict(adapt=[True] * 5, bias_correction=False)),
    "phi_bounds": ({"phi_bounds": (0.05, 2.0)}, {}, lambda pb: dict(adapt=[True] * 5, phi_bounds=(0.05, 2.0))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("config", list(LAMB_CONFIGS))
def test_lamb_matches_algorithm_2(config, path, dtype):
    kwargs, no_decay, _ = LAMB_CONFIGS[config]
    pb = make_problem(dtype)
    params = pb.params(dtype)
    opt = LAMB(pb.groups(params, **no_decay), lr=0.0, betas=(B1, B2), eps=EPS, weight_decay=0.01,
               **kwargs, **PATHS[path])
    run(opt, params, pb)
    assert max_rel_err(params, _expected(lamb_reference, id(LAMB_CONFIGS), config, dtype)) < TOL[dtype]


@cache
def _expected(reference, configs_id, config, dtype, **problem):
    configs = {id(c): c for c in (LAMB_CONFIGS, LANS_CONFIGS, LARS_CONFIGS)}[configs_id]
    pb = make_problem(dtype, **problem)
    ref_kwargs = configs[config][2](pb)
    if reference is lars_reference:
        return reference(pb.x0, pb.grads, pb.lrs, momentum=0.9, wd=pb.wd(), **ref_kwargs)
    return reference(pb.x0, pb.grads, pb.lrs, beta1=B1, beta2=B2, eps=EPS, wd=pb.wd(), **ref_kwargs)


def test_lamb_apex_defaults_constructor():
    pb = make_problem(torch.float64)
    params = pb.params(torch.float64)
    opt = LAMB.from_apex_defaults(pb.groups(params), lr=0.0)
    group = opt.param_groups[0]
    assert (group["eps"], group["weight_decay"], group["max_grad_norm"]) == (1e-6, 0.01, 1.0)
    assert group["skip_adaptation_without_decay"] is True
    run(opt, params, pb)
    expected = lamb_reference(pb.x0, pb.grads, pb.lrs, beta1=0.9, beta2=0.999, eps=1e-6, wd=pb.wd(),
                              adapt=pb.decay, max_grad_norm=1.0)
    assert max_rel_err(params, expected) < 1e-12


def test_lamb_variants_really_differ():
    """The options change the result: a test of them could fail."""
    pb = make_problem(torch.float64)
    base = lamb_reference(pb.x0, pb.grads, pb.lrs, beta1=B1, beta2=B2, eps=EPS, wd=pb.wd(), adapt=[True] * 5)
    for _, _, ref_kwargs in list(LAMB_CONFIGS.values())[1:]:
        other = lamb_reference(pb.x0, pb.grads, pb.lrs, beta1=B1, beta2=B2, eps=EPS, wd=pb.wd(), **ref_kwargs(pb))
        params = [torch.tensor(a) for a in other]
        assert max_rel_err(params, base) > 1e-4


LANS_CONFIGS = {
    "paper": ({}, {}, lambda pb: dict(adapt=[True] * 5)),
    "excluded": ({}, {"layer_adaptation": False}, lambda pb: dict(adapt=pb.decay)),
    "no_bias_correction": ({"bias_correction": False}, {}, lambda pb: dict(adapt=[True] * 5, bias_correction=False)),
    "phi_bounds": ({"phi_bounds": (0.05, 2.0)}, {}, lambda pb: dict(adapt=[True] * 5, phi_bounds=(0.05, 2.0))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("config", list(LANS_CONFIGS))
def test_lans_matches_algorithm_2(config, path, dtype):
    kwargs, no_decay, _ = LANS_CONFIGS[config]
    pb = make_problem(dtype, zero_grad_steps=4)  # a block with an all-zero gradient
    params = pb.params(dtype)
    opt = LANS(pb.groups(params, **no_decay), lr=0.0, betas=(B1, B2), eps=EPS, weight_decay=0.01,
               **kwargs, **PATHS[path])
    run(opt, params, pb)
    expected = _expected(lans_reference, id(LANS_CONFIGS), config, dtype, zero_grad_steps=4)
    assert all(torch.isfinite(p).all() for p in params)
    assert max_rel_err(params, expected) < TOL[dtype]


LARS_CONFIGS = {
    "paper": ({}, {}, lambda pb: dict(adapt=[True] * 5)),
    "recipe": ({"trust_coefficient": 0.5, "eps": 1e-9}, {"layer_adaptation": False},
               lambda pb: dict(adapt=pb.decay, trust_coefficient=0.5, eps=1e-9)),
    "phi_bounds": ({"phi_bounds": (0.05, 2.0)}, {}, lambda pb: dict(adapt=[True] * 5, phi_bounds=(0.05, 2.0))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["single", "foreach"])
@pytest.mark.parametrize("config", list(LARS_CONFIGS))
def test_lars_matches_algorithm_1(config, path, dtype):
    kwargs, no_decay, _ = LARS_CONFIGS[config]
    pb = make_problem(dtype)
    params = pb.params(dtype)
    opt = LARS(pb.groups(params, **no_decay), lr=0.0, momentum=0.9, weight_decay=0.01, **kwargs,
               foreach=PATHS[path]["foreach"])
    run(opt, params, pb)
    assert max_rel_err(params, _expected(lars_reference, id(LARS_CONFIGS), config, dtype)) < TOL[dtype]


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_multi_tensor_chunks_do_not_change_the_result(cls):
    """Chunking the multi-tensor path (several tensors per chunk, a tensor bigger than a chunk) is exact."""
    pb = make_problem(torch.float32)
    results = []
    for chunk in (None, 3000, 10**9):
        params = pb.params(torch.float32)
        opt = cls(pb.groups(params), lr=0.0, foreach=True)
        opt.chunk_numel = chunk
        run(opt, params, pb)
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LAMB, LANS, LARS])
def test_foreach_equals_single_tensor_in_float32(cls):
    pb = make_problem(torch.float32)
    out = {}
    for path in ("single", "foreach"):
        params = pb.params(torch.float32)
        opt = cls(pb.groups(params), lr=0.0, foreach=PATHS[path]["foreach"])
        run(opt, params, pb)
        out[path] = params
    for a, b in zip(out["single"], out["foreach"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _layouts(dtype):
    """(parameter, gradient) makers: channels_last, transposed, non-dense, and a gradient whose
    layout differs from its parameter's (torch's fused Adam kernel walks memory linearly)."""
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype) * 0.1

    return [
        (lambda: rand(8, 4, 3, 3).to(memory_format=torch.channels_last),
         lambda: rand(8, 4, 3, 3).to(memory_format=torch.channels_last)),
        (lambda: rand(5, 7).t(), lambda: rand(5, 7).t()),
        (lambda: rand(6, 8)[:, ::2], lambda: rand(6, 4)),
        (lambda: rand(4, 6), lambda: rand(6, 4).t()),
    ]


LAYOUT_CASES = [(cls, ref, path) for cls, ref in ((LAMB, lamb_reference), (LANS, lans_reference), (LARS, lars_reference))
                for path in PATHS if not (cls is LARS and path == "fused")]


@pytest.mark.parametrize(("cls", "reference", "path"), LAYOUT_CASES)
def test_memory_layouts(cls, reference, path):
    dtype = torch.float64
    makers = _layouts(dtype)
    params = [torch.nn.Parameter(make_p()) for make_p, _ in makers]
    x0 = [p.detach().numpy().copy() for p in params]
    grads = [[make_g() for _, make_g in makers] for _ in range(6)]
    kwargs = {k: v for k, v in PATHS[path].items() if not (cls is LARS and k == "fused")}
    opt = cls(params, lr=0.05, weight_decay=0.01, **kwargs)
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad
        opt.step()
    np_grads = [[grad.numpy() for grad in step] for step in grads]
    common = dict(wd=[0.01] * 4, adapt=[True] * 4)
    if cls is LARS:
        expected = reference(x0, np_grads, [0.05] * 6, momentum=0.9, **common)
    else:
        expected = reference(x0, np_grads, [0.05] * 6, beta1=B1, beta2=B2, eps=EPS, **common)
    assert max_rel_err(params, expected) < 1e-12
