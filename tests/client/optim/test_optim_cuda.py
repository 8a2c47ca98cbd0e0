"""On a GPU (skipped elsewhere; ``scripts/gpu_check.sh`` runs them): the fused Triton kernels against
the float64 references and the foreach path, no host synchronisation in ``step()``
(``torch.cuda.set_sync_debug_mode("error")``), a CUDA-graph capture of a LAMB step and
``torch.compile(fullgraph=True)`` of the step.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import make_problem, max_rel_err
from optim_reference import lamb_reference, lans_reference
from test_optim_reference import LAMB_CONFIGS, LANS_CONFIGS

from largebatch.client.optim import LAMB, LANS, LARS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def run_cuda(opt, params, pb, steps=None):
    for t in range(len(pb.grads) if steps is None else steps):
        for p, g in zip(params, pb.grads[t], strict=True):
            p.grad = torch.tensor(g, dtype=p.dtype, device=CUDA)
        for group in opt.param_groups:
            group["lr"] = pb.lrs[t]
        opt.step()


def cuda_params(pb, dtype):
    return [torch.nn.Parameter(p.detach().to(CUDA)) for p in pb.params(dtype)]


CASES = [(LAMB, lamb_reference, c) for c in LAMB_CONFIGS] + [(LANS, lans_reference, c) for c in LANS_CONFIGS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("cls", "reference", "config"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_fused_on_cuda_matches_the_reference_and_the_foreach_path(cls, reference, config, dtype):
    kwargs, no_decay, ref_kwargs = (LAMB_CONFIGS if cls is LAMB else LANS_CONFIGS)[config]
    pb = make_problem(dtype, zero_grad_steps=4 if cls is LANS else 0)
    out = {}
    for path in ({}, {"fused": False}):  # the default on CUDA is the fused path
        params = cuda_params(pb, dtype)
        run_cuda(cls(pb.groups(params, **no_decay), lr=0.0, **kwargs, **path), params, pb)
        out["fused" if not path else "foreach"] = [p.detach().cpu() for p in params]
    expected = reference(pb.x0, pb.grads, pb.lrs, beta1=0.9, beta2=0.999, eps=1e-6, wd=pb.wd(), **ref_kwargs(pb))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert max_rel_err(out["fused"], expected) < tol
    assert max_rel_err(out["fused"], [p.double().numpy() for p in out["foreach"]]) < tol


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_fused_bf16_on_cuda_tracks_the_foreach_path(cls):
    pb = make_problem(torch.bfloat16, steps=6)
    out = []
    for path in ({}, {"fused": False}):
        params = cuda_params(pb, torch.bfloat16)
        run_cuda(cls(pb.groups(params), lr=0.0, **path), params, pb)
        out.append([p.detach().float().cpu() for p in params])
    for a, b in zip(*out, strict=True):
        assert (a != b).float().mean() < 0.01
        assert (a - b).abs().max() <= 2**-7 * b.abs().max()


OPTIMIZERS = {
    "lamb-fused": lambda ps: LAMB(ps, lr=0.01),
    "lamb-apex-fused": lambda ps: LAMB.from_apex_defaults(ps, lr=0.01),
    "lamb-foreach": lambda ps: LAMB(ps, lr=0.01, fused=False),
    "lamb-single": lambda ps: LAMB(ps, lr=0.01, foreach=False),
    "lans-fused": lambda ps: LANS(ps, lr=0.01),
    "lans-foreach": lambda ps: LANS(ps, lr=0.01, fused=False),
    "lars-foreach": lambda ps: LARS(ps, lr=0.01, weight_decay=0.01),
    "lamb-capturable": lambda ps: LAMB(ps, lr=0.01, capturable=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ten_steps_without_a_host_sync(name):
    """``set_sync_debug_mode("error")`` raises on any synchronising CUDA call: none in 10 steps, one
    of which has a NaN gradient (skipped on the device)."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=CUDA, generator=g)) for s in ((256, 128), (128,), (7, 3, 3))]
    grads = [[torch.randn(p.shape, device=CUDA, generator=g) for p in params] for _ in range(11)]
    grads[5][0][3, 4] = math.nan
    opt = OPTIMIZERS[name]([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    for p, gr in zip(params, grads[0], strict=True):
        p.grad = gr
    opt.step()  # state creation and the first kernel compilations are not the steady state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in grads[1:]:
            for p, gr in zip(params, step, strict=True):
                p.grad = gr
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("cls", [LAMB, LANS])
def test_a_step_captured_in_a_cuda_graph_replays_like_eager(cls):
    g = torch.Generator(device=CUDA).manual_seed(1)
    shapes = ((512, 256), (256,), (1,))
    start = [torch.randn(s, device=CUDA, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, device=CUDA, generator=g) * 0.01 for s in shapes] for _ in range(8)]
    lrs = [0.01 * (1 + t) for t in range(8)]

    eager = [torch.nn.Parameter(x.clone()) for x in start]
    eager_opt = cls(eager, lr=0.01, capturable=True)
    for t in range(8):
        for p, gr in zip(eager, grads[t], strict=True):
            p.grad = gr.clone()
        eager_opt.param_groups[0]["lr"].fill_(lrs[t])
        eager_opt.step()

    params = [torch.nn.Parameter(x.clone()) for x in start]
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradient buffers, filled before each replay
    opt = cls(params, lr=0.01, capturable=True)

    def feed(t):
        for p, gr in zip(params, grads[t], strict=True):
            p.grad.copy_(gr)
        opt.param_groups[0]["lr"].fill_(lrs[t])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (state, kernel compilation, tables) on a side stream
        for t in range(3):
            feed(t)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t in range(3, 8):
        feed(t)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [LAMB])  # (a compile takes ~30 s; CPU tests check every optimizer traces)
def test_the_step_compiles_in_one_graph_on_cuda(cls):
    g = torch.Generator(device=CUDA).manual_seed(2)
    start = [torch.randn(s, device=CUDA, generator=g) for s in ((64, 32), (32,))]
    grads = [[torch.randn(x.shape, device=CUDA, generator=g) for x in start] for _ in range(4)]
    results = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        opt = cls(params, lr=0.01)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for t in range(4):
            for p, gr in zip(params, grads[t], strict=True):
                p.grad = gr.clone()
            step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
