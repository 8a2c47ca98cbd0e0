"""Hugging Face Trainer end to end: a tiny randomly initialised GPT-2 (from a config, no download),
trained on CPU with the recipe's LAMB and scheduler, reporting to a real service."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from largebatch.client import Client  # noqa: E402
from largebatch.client.integrations.hf import LargebatchCallback, optimizers, training_args  # noqa: E402
from largebatch.scaling_rules.schedule import lr_at  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

VOCAB, SEQ = 32, 16


class Counting(torch.utils.data.Dataset):
    """Sequences that count modulo VOCAB from a random start: learnable in a few dozen steps."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordLR(TrainerCallback):
    """The LR of every param group right before each optimizer step."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step] = [g["lr"] for g in optimizer.param_groups]


def test_trainer_with_the_recipe_reports_and_completes(service, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))
    client = Client(service.url)
    job = client.autoconfigure(model, study="hf-gpt2", target_batch_size=32,
                               reference={"batch_size": 8, "lr": 3e-2, "steps": 320, "warmup_ratio": 0.05},
                               job_options={"flush_interval": 0.1})
    total = job.recipe.total_steps
    assert total == 80 and type(job.optimizer).__name__ == "LAMB"
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=total, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, **training_args(job))
    record = RecordLR()
    callback = LargebatchCallback(job)
    with job:
        trainer = Trainer(model=model, args=args, train_dataset=Counting(320, 1), eval_dataset=Counting(64, 2),
                          optimizers=optimizers(job), callbacks=[callback, record])
        trainer.train()

    # The Trainer ran the recipe's schedule: the LR before the k-th optimizer step is lr_at(recipe, k).
    assert sorted(record.lrs) == list(range(total))
    for step, lrs in record.lrs.items():
        assert lrs == [lr_at(job.recipe, step)] * len(lrs), step
    # The callback reported every logged loss and completed the run with the eval loss.
    run = service.store.get_run(job.run.id)
    assert run.state == "completed" and run.metric == callback.last_metric
    # A GPT-2 built from a config has no loss_type: the Trainer divides its summed token loss by the
    # unshifted label count (SEQ per sequence, SEQ - 1 predicted); the callback measures the true one.
    hf = SEQ / (SEQ - 1)
    assert run.metric == pytest.approx(trainer.state.log_history[-2]["eval_loss"] * hf, rel=1e-5)
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(total))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [r.loss for r in reports] == pytest.approx([loss * hf for loss in logged], rel=1e-4)
    assert reports[-1].loss < reports[0].loss / 2  # it learned to count


def test_trainer_arguments_that_disagree_with_the_recipe_are_refused(service, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))
    job = Client(service.url).autoconfigure(model, study="hf-mismatch", target_batch_size=32,
                                            reference={"batch_size": 8, "lr": 3e-2, "steps": 320},
                                            job_options={"flush_interval": 0.1})
    plan = training_args(job, per_device_batch_size=8)
    assert (plan["per_device_train_batch_size"], plan["gradient_accumulation_steps"]) == (8, 4)
    assert plan["max_grad_norm"] == 0.0 and plan["logging_steps"] == 1  # no hidden clipping; every step reported
    common = dict(output_dir=str(tmp_path), save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    for wrong, match in (({**plan, "max_steps": 100}, "max_steps is 100 but the recipe has 80"),
                         ({**plan, "per_device_train_batch_size": 16}, "batches of 64 .* recipe is for 32")):
        trainer = Trainer(model=model, args=TrainingArguments(**common, **wrong), train_dataset=Counting(320, 1),
                          optimizers=optimizers(job), callbacks=[LargebatchCallback(job)])
        with pytest.raises(ValueError, match=match):
            trainer.train()
    assert service.store.reports(job.run.id) == []  # refused before the first step
    job.fail("refused")


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_stored_loss_is_the_true_loss_and_evaluate_after_train_completes(name, service, tmp_path, caplog):
    """Accumulation 4, no evaluation while training (the Trainer logs 4x the true loss of the BERT
    classifier, and divides the padded GPT-2's by its unshifted token count): every stored loss is
    the true per-example loss of its step, and ``trainer.evaluate()`` after ``train()`` completes the
    run with the true evaluation loss."""
    from .ddp_hf_worker import Counting as Padded
    from .ddp_hf_worker import build, true_loss

    torch.manual_seed(0)
    model = build(name)
    micro: list[tuple[float, int]] = []
    evals: list[tuple[float, int]] = []

    def record(module, args, kwargs, output):
        with torch.no_grad():
            (micro if module.training else evals).append(true_loss(name, output.logits, kwargs["labels"]))

    model.register_forward_hook(record, with_kwargs=True)
    job = Client(service.url).autoconfigure(model, study=f"hf-true-{name}", target_batch_size=32,
                                            reference={"batch_size": 8, "lr": 2e-2, "steps": 48},
                                            job_options={"flush_interval": 0.1})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=16, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                             **training_args(job, per_device_batch_size=8))
    assert args.gradient_accumulation_steps == 4
    with job, caplog.at_level("WARNING", logger="largebatch.client"):
        trainer = Trainer(model=model, args=args, train_dataset=Padded(512, 1, name), optimizers=optimizers(job),
                          callbacks=[LargebatchCallback(job)])
        trainer.train()
        assert "call trainer.evaluate() inside `with job:`" in caplog.text  # and what leaving without it does
        assert service.store.get_run(job.run.id).state == "running"
        trainer.evaluate(Padded(48, 2, name))
    run = service.store.get_run(job.run.id)
    assert run.state == "completed"
    assert run.metric == pytest.approx(sum(s for s, _ in evals) / sum(n for _, n in evals), rel=1e-6)
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(job.recipe.total_steps))
    for r in reports:
        step = micro[4 * r.step: 4 * r.step + 4]
        truth = sum(s for s, _ in step) / sum(n for _, n in step)
        assert r.loss == pytest.approx(truth, rel=1e-4), (r.step, r.loss, truth)
