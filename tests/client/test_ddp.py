"""One run per job under DDP (issue 16): HF ``Trainer`` under ``torchrun --nproc_per_node=2`` and
Lightning ``devices=2, strategy="ddp"``, two gloo processes on CPU, gradient accumulation 4.

Each worker (``ddp_hf_worker.py``, ``ddp_lightning_worker.py``) records, from its model's own
forward pass, the summed loss and the example (token) count of every training micro-batch of its
rank; the true per-example loss of optimizer step s is the sum over both ranks and the 4
micro-batches of s divided by the count. The stored losses must match it within 1e-4 (relative), for
a GPT-2 built from a config without ``loss_type`` on padded batches and for a BERT sequence
classifier (whose Trainer-logged loss is 8x the true one), and the HF runs' final metric is the true
evaluation loss over the whole evaluation set (both ranks' shares).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # two training processes and a `largebatch serve` subprocess

HERE = Path(__file__).parent
HF_WORKER, LIGHTNING_WORKER = HERE / "ddp_hf_worker.py", HERE / "ddp_lightning_worker.py"


def launch(framework: str, service, study: str, out: Path, mode: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = [service.url, study, str(out), mode]
    if framework.startswith("hf"):  # hf: the GPT-2, hf-bert: the BERT classifier
        args.append(framework.partition("-")[2] or "gpt2")
        pytest.importorskip("transformers")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(HF_WORKER), *args]
    else:
        pytest.importorskip("lightning")
        cmd = [sys.executable, str(LIGHTNING_WORKER), *args]  # Lightning starts rank 1 itself
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LARGEBATCH_JOB")}
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    # No exception may escape, divergence included: both ranks exit 0. A hung rank (the HF worker's
    # watchdog) left where each rank was.
    stacks = "".join(f"\n--- {p.name}:\n{p.read_text()}" for p in sorted(out.glob("rank*.stacks")) if p.stat().st_size)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:] + stacks
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def true_eval_loss(ranks: list[dict]) -> float:
    return sum(s for r in ranks for s, _ in r["evals"]) / sum(n for r in ranks for _, n in r["evals"])


def true_losses(ranks: list[dict]) -> dict[int, float]:
    accumulation = ranks[0]["accumulation"]
    sums: dict[int, list[float]] = {}
    for rank in ranks:
        for i, (loss_sum, count) in enumerate(rank["micro"]):
            acc = sums.setdefault(i // accumulation, [0.0, 0])
            acc[0] += loss_sum
            acc[1] += count
    return {step: s / n for step, (s, n) in sums.items()}


# hf: a GPT-2 built from a config (no loss_type), on padded batches; hf-bert: a BERT sequence classifier.
@pytest.mark.parametrize("framework", ["hf", "hf-bert", "lightning"])
def test_ddp_one_run_completed_with_true_losses(framework, service, tmp_path):
    study = f"ddp-{framework}"
    ranks = launch(framework, service, study, tmp_path, "ok")
    assert [r["world"] for r in ranks] == [2, 2] and [r["accumulation"] for r in ranks] == [4, 4]
    runs = service.store.list_runs("default", study).items
    assert len(runs) == 1, [(r.id, r.state) for r in runs]
    run = runs[0]
    assert run.state == "completed" and run.metric is not None
    assert ranks[0]["run"] == ranks[1]["run"] == run.id
    total = ranks[0]["total_steps"]
    assert run.batch_size == 32 and run.steps == total and ranks[0]["global_step"] == total
    # 4 micro-batches of 4 per rank and step: 32 examples per optimizer step, as the recipe says
    assert all(len(r["micro"]) == 4 * total for r in ranks)
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(total))  # logging_steps=1: every step
    truth = true_losses(ranks)
    for r in reports:
        assert r.loss == pytest.approx(truth[r.step], rel=1e-4), (r.step, r.loss, truth[r.step])
    if framework.startswith("hf"):  # the final metric is the true evaluation loss over the whole set
        assert sum(n for _, n in ranks[0]["evals"]) and run.metric == pytest.approx(true_eval_loss(ranks), rel=1e-6)


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_ddp_lr_blowup_is_recorded_as_divergence(framework, service, tmp_path):
    study = f"ddp-{framework}-blowup"
    ranks = launch(framework, service, study, tmp_path, "blowup")
    runs = service.store.list_runs("default", study).items
    assert len(runs) == 1
    run = runs[0]
    assert run.state == "diverged" and run.diverged_step is not None, (run.state, run.reason)
    total = ranks[0]["total_steps"]
    # Both ranks stopped at the same step, well before the end.
    assert ranks[0]["global_step"] == ranks[1]["global_step"] < total
    # At the latest at the first vote after rank 0 heard the service say stop (None: the stop came from
    # a non-finite loss at a vote): decided by the steps, not by how fast a loaded machine runs them.
    learned = ranks[0]["learned"]
    assert run.diverged_step < ranks[0]["global_step"], (run.diverged_step, ranks[0]["global_step"])
    assert learned is None or ranks[0]["global_step"] <= learned, (learned, ranks[0]["global_step"])
