"""Training under FSDP2 on 2 CPU processes (gloo), and the same training unsharded, for the FSDP test."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from largebatch.client.optim import (
    LAMB,
    LANS,
    LARS,
    NonFiniteGradientError,
    _cpu_fused,
    _fused,
    param_groups_for,
)
from largebatch.client.optim._fused import fused_available

STEPS = 10
BATCH = 8
NAN_STEP = 5

CONFIGS = {
    "lamb": lambda groups: LAMB(groups, lr=0.05),
    "lamb-single": lambda groups: LAMB(groups, lr=0.05, foreach=False),
    "lamb-apex": lambda groups: LAMB.from_apex_defaults(groups, lr=0.05, max_grad_norm=0.1),
    "lans": lambda groups: LANS(groups, lr=0.05),
    "lans-single": lambda groups: LANS(groups, lr=0.05, foreach=False),
    "lars": lambda groups: LARS(groups, lr=0.5, weight_decay=0.01),
    "lamb-skip": lambda groups: LAMB(groups, lr=0.05, nonfinite="skip"),
}
if fused_available(torch.device("cpu")):  # the Triton kernels, under the interpreter (see conftest.py)
    CONFIGS["lamb-fused"] = lambda groups: LAMB(groups, lr=0.05, fused=True)
    CONFIGS["lamb-apex-fused"] = lambda groups: LAMB.from_apex_defaults(groups, lr=0.05, max_grad_norm=0.1,
                                                                         fused=True)
    CONFIGS["lans-fused"] = lambda groups: LANS(groups, lr=0.05, fused=True)
if _cpu_fused.unavailable_reason() is None:  # the fused path's C kernels ("-ckernel": see backend())
    CONFIGS["lamb-ckernel"] = lambda groups: LAMB(groups, lr=0.05, fused=True)
    CONFIGS["lamb-apex-ckernel"] = lambda groups: LAMB.from_apex_defaults(groups, lr=0.05, max_grad_norm=0.1,
                                                                           fused=True)
    CONFIGS["lans-ckernel"] = lambda groups: LANS(groups, lr=0.05, fused=True)


def backend(name: str):
    """The CPU kernels a config's fused steps run on: C for "-ckernel", else the default."""
    return _fused.cpu_backend("c" if name.endswith("-ckernel") else None)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), 1.5))  # 1 element: one rank's shard is empty

    def forward(self, x):
        return x * self.gain


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    # 5 and 3 rows: uneven shards on 2 ranks
    return nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), Scale()).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 7, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 3, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def train_unsharded(name: str) -> list[torch.Tensor]:
    model = make_model()
    opt = CONFIGS[name](param_groups_for(model, 0.01))
    for step, (x, y) in enumerate(batches()):
        nn.functional.mse_loss(model(x), y).backward()
        if name == "lamb-skip" and step == NAN_STEP:
            model[0].weight.grad[3, 0] = float("nan")  # the element rank 1 holds in the sharded run
        with backend(name):
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)


def worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict[str, object] = {}
    try:
        per_rank = BATCH // world
        for name, factory in CONFIGS.items():
            model = make_model()
            _shard(model)
            opt = factory(param_groups_for(model, 0.01))
            for step, (x, y) in enumerate(batches()):
                lo = rank * per_rank
                # FSDP2 averages gradients over ranks: the mean of local means is the full-batch mean
                nn.functional.mse_loss(model(x[lo : lo + per_rank]), y[lo : lo + per_rank]).backward()
                if name == "lamb-skip" and step == NAN_STEP and rank == 1:
                    model[0].weight.grad.to_local()[0, 0] = float("nan")
                with backend(name):
                    opt.step()
                opt.zero_grad()
            results[name] = [p.full_tensor().detach().clone() for p in model.parameters()]
            state = next(iter(opt.state.values()))
            results[name + ":state_is_dtensor"] = all(
                isinstance(v, DTensor) for k, v in state.items() if k != "step")
            results[name + ":skipped"] = opt.skipped_steps

        # raise mode: a NaN in rank 1's shard only; every rank must raise (no hang, no divergence)
        model = make_model()
        _shard(model)
        opt = LAMB(param_groups_for(model, 0.01), lr=0.05, nonfinite="raise")
        x, y = batches()[0]
        nn.functional.mse_loss(model(x), y).backward()
        if rank == 1:
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        try:
            opt.step()
            results["raised"] = False
        except NonFiniteGradientError:
            results["raised"] = True
        raised = torch.tensor([float(results["raised"])])
        dist.all_reduce(raised)
        results["ranks_that_raised"] = int(raised.item())

        # FSDP1 flat parameters are refused
        from torch.distributed.fsdp import FullyShardedDataParallel

        flat = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
        try:
            LAMB(flat.parameters(), lr=0.1)
            results["fsdp1"] = "accepted"
        except ValueError as e:
            results["fsdp1"] = str(e)
    finally:
        if rank == 0:
            torch.save(results, out_file)
        # Both ranks leave together: tearing gloo down while the peer still talks aborts the process
        # ("terminate called without an active exception", exit -6) after a correct run.
        dist.barrier()
        dist.destroy_process_group()
