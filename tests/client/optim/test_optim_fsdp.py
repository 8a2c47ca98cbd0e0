"""Sharded parameters for real: FSDP2 (``fully_shard``) on 2 CPU processes with gloo.

10 steps under FSDP2 (uneven shards, an empty shard) equal 10 unsharded steps within 1e-6, for every
optimizer and code path: the per-layer norms are full-tensor norms, and so are the global clip norm
and the non-finite decision (a NaN in one rank's shard makes every rank skip, or every rank raise).
FSDP1 flat parameters are refused.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from optim_dist_worker import CONFIGS, train_unsharded, worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    tmp = tmp_path_factory.mktemp("fsdp")
    init_file, out_file = str(tmp / "init"), str(tmp / "results.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, 2, init_file, out_file)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("an FSDP2 worker hung")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return torch.load(out_file, weights_only=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_equals_unsharded(sharded_results, name):
    sharded = sharded_results[name]
    unsharded = train_unsharded(name)
    for a, b in zip(sharded, unsharded, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-6
    assert sharded_results[name + ":state_is_dtensor"]  # distributed checkpointing sees DTensor state


def test_fsdp2_training_moved_the_parameters(sharded_results):
    start = [p.detach() for p in __import__("optim_dist_worker").make_model().parameters()]
    moved = [(a - b).abs().max().item() for a, b in zip(sharded_results["lamb"], start, strict=True)]
    assert min(moved) > 1e-3


def test_fsdp2_nonfinite_decision_is_global(sharded_results):
    assert sharded_results["lamb-skip:skipped"] == 1
    assert sharded_results["lamb:skipped"] == 0
    assert sharded_results["ranks_that_raised"] == 2


def test_fsdp1_flat_parameters_are_refused(sharded_results):
    assert sharded_results["fsdp1"].startswith("LAMB cannot be used with FSDP1 (FullyShardedDataParallel) flat parameters")
