"""How scaling_fidelity.py tunes its B0 references: a reference at the edge of a coarse grid hands its
tuning error to every rule that scales it, so the sweep widens past an edge and refines around the best."""

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling_fidelity as sf


def _sweep(monkeypatch, best_lr: float, quick: bool = False, diverge_above: float = math.inf) -> list[float]:
    """The LRs tune_reference runs on a U-shaped loss with its minimum at ``best_lr``."""

    def fake_run(task, scale, name, recipe, **_):
        lr = recipe.stages[0].peak_lr
        loss = 1.0 + math.log(lr / best_lr) ** 2
        return sf.Result(task.name, scale, name, recipe.stages[0].batch_size, lr, recipe.total_steps,
                         math.nan if lr > diverge_above else loss, lr > diverge_above, 0.0)

    monkeypatch.setattr(sf, "run", fake_run)
    task = sf.Task("mlp", b0=8, examples=800, make_model=None, train_x=None, train_y=None, val_x=None, val_y=None)
    ran: list[float] = []
    sf.tune_reference(task, "lamb", (1e-3, 3e-3, 9e-3), 100, 0.005, quick, lambda r, _: ran.append(r.lr))
    return ran


def test_the_sweep_widens_past_an_edge_and_refines(monkeypatch):
    ran = _sweep(monkeypatch, best_lr=0.05)
    assert ran[:4] == pytest.approx([1e-3, 3e-3, 9e-3, 2.7e-2])  # the best sat at the top: widened
    assert ran[4:6] == pytest.approx([8.1e-2, 2.43e-1])  # at the edge until 8.1e-2 is flanked by a worse LR
    best = min(ran, key=lambda lr: abs(math.log(lr / 0.05)))
    assert abs(math.log(best / 0.05)) < math.log(3) / 2  # the midpoints bring it within half a grid step
    assert len(ran) == len(set(ran)) == 8


def test_an_interior_best_is_only_refined(monkeypatch):
    ran = _sweep(monkeypatch, best_lr=3e-3)
    assert ran == pytest.approx([1e-3, 3e-3, 9e-3, 3e-3 / math.sqrt(3), 3e-3 * math.sqrt(3)])


def test_widening_stops_after_three_and_quick_mode_keeps_the_grid(monkeypatch):
    assert len(_sweep(monkeypatch, best_lr=10.0)) == 3 + 3 + 2  # 3 widenings, still at the edge: stop, refine
    assert _sweep(monkeypatch, best_lr=10.0, quick=True) == pytest.approx([1e-3, 3e-3, 9e-3])


def test_a_diverged_edge_is_not_the_best(monkeypatch):
    ran = _sweep(monkeypatch, best_lr=0.05, diverge_above=0.02)
    assert max(ran) == pytest.approx(2.7e-2)  # widened once; the diverged run ended the climb
