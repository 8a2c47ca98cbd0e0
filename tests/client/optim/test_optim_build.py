"""`param_groups_for`, `RecipeLR`, `build`, and real training runs driven by a recipe."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from largebatch.client.optim import LAMB, LANS, LARS, RecipeLR, build, param_groups_for
from largebatch.scaling_rules.models import OptimizerConfig, Recipe, Stage
from largebatch.scaling_rules.schedule import lr_at


def make_recipe(name: str = "lamb", lr: float = 0.02, **options) -> Recipe:
    stages = [
        Stage(batch_size=64, steps=12, peak_lr=lr, warmup_steps=3, const_steps=3, decay_steps=6,
              warmup_ratio=0.25, const_ratio=0.25),
        Stage(batch_size=128, steps=8, peak_lr=lr / 2, warmup_steps=2, const_steps=0, decay_steps=6,
              warmup_ratio=0.25, const_ratio=0.0, decay="cosine", end_lr=lr / 20),
    ]
    return Recipe(optimizer=OptimizerConfig(name=name, lr=lr, **options), stages=stages, total_steps=20)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.ln_f = nn.LayerNorm(8)  # no "LayerNorm" in its name
        self.bn = nn.BatchNorm1d(8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(8))  # 1-D but not a norm or bias: keeps weight decay


def names(groups, **match):
    for g in groups:
        if all(g[k] == v for k, v in match.items()):
            return set(g["param_names"])
    return set()


# -- param_groups_for ---------------------------------------------------------------------------------


def test_norms_and_biases_are_found_by_type_not_name():
    groups = param_groups_for(Block(), 0.01)
    assert names(groups, weight_decay=0.01, layer_adaptation=True) == {"embed.weight", "proj.weight", "scale"}
    assert names(groups, weight_decay=0.0, layer_adaptation=False) == {
        "proj.bias", "ln_f.weight", "ln_f.bias", "bn.weight", "bn.bias", "rms.weight"}
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == 9
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])


def test_name_patterns_add_to_the_structural_exclusions():
    groups = param_groups_for(Block(), 0.05, exclude=["embed", "sc*le"])
    assert names(groups, weight_decay=0.05) == {"proj.weight"}


def test_weight_decay_and_adaptation_exclusions_are_separate():
    groups = param_groups_for(Block(), 0.01, exclude=["scale"], exclude_from_adaptation=["embed"])
    assert names(groups, weight_decay=0.01, layer_adaptation=True) == {"proj.weight"}
    assert names(groups, weight_decay=0.01, layer_adaptation=False) == {"embed.weight"}
    assert names(groups, weight_decay=0.0, layer_adaptation=True) == {"scale"}
    assert "ln_f.weight" in names(groups, weight_decay=0.0, layer_adaptation=False)


def test_param_groups_for_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        param_groups_for(Block(), -1)
    with pytest.raises(TypeError, match="exclude must be a list of name patterns, not a string"):
        param_groups_for(Block(), 0.01, exclude="bias")


# -- RecipeLR -------------------------------------------------------------------------------------------


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=1.0)


def test_recipe_lr_follows_the_schedule_function_exactly():
    recipe = make_recipe()
    model = nn.Linear(2, 1)
    opt = _sgd(model)
    sched = RecipeLR(opt, recipe)
    seen = []
    for _ in range(recipe.total_steps + 3):  # past the end: the last stage's end_lr
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(recipe, k) for k in range(recipe.total_steps + 3)]
    assert seen[-1] == recipe.stages[-1].end_lr
    assert seen[12] == lr_at(recipe, 12) == recipe.stages[1].peak_lr / 2  # the second stage re-warms


@pytest.mark.parametrize("order", ["optimizer-first", "scheduler-first"])
def test_recipe_lr_resumes_on_the_same_curve(order):
    recipe = make_recipe()
    model = nn.Linear(2, 1)
    opt = _sgd(model)
    sched = RecipeLR(opt, recipe)
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    opt2 = _sgd(nn.Linear(2, 1))
    sched2 = RecipeLR(opt2, recipe)
    if order == "optimizer-first":
        opt2.load_state_dict(ckpt["opt"])
        sched2.load_state_dict(ckpt["sched"])
    else:
        sched2.load_state_dict(ckpt["sched"])
        opt2.load_state_dict(ckpt["opt"])
    for k in range(7, recipe.total_steps + 2):
        assert opt2.param_groups[0]["lr"] == lr_at(recipe, k)
        assert sched2.get_last_lr() == [lr_at(recipe, k)] or k > 7
        opt2.step()
        sched2.step()


def test_recipe_lr_refuses_a_checkpoint_of_another_recipe():
    opt = _sgd(nn.Linear(2, 1))
    saved = RecipeLR(opt, make_recipe(lr=0.02)).state_dict()
    other = RecipeLR(_sgd(nn.Linear(2, 1)), make_recipe(lr=0.03))
    with pytest.raises(ValueError, match="the checkpoint follows another recipe"):
        other.load_state_dict(saved)


def test_recipe_lr_accepts_a_recipe_as_a_dict():
    recipe = make_recipe()
    sched = RecipeLR(_sgd(nn.Linear(2, 1)), recipe.model_dump(mode="json"))
    assert sched.recipe_fingerprint == recipe.fingerprint()


# -- build ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("lamb", LAMB), ("lans", LANS), ("lars", LARS), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_build_maps_names_to_optimizers(name, cls):
    options = {"momentum": 0.8, "trust_coefficient": 0.01, "eps": 1e-9} if name in ("lars", "sgd") else {}
    if name == "sgd":
        options.pop("trust_coefficient")
    opt, sched = build(Block(), make_recipe(name, weight_decay=0.02, exclude_from_weight_decay=["embed"], **options))
    assert type(opt) is cls and isinstance(sched, RecipeLR)
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert {n for g in decayed for n in g["param_names"]} == {"proj.weight", "scale"}
    assert decayed[0]["weight_decay"] == 0.02
    assert opt.param_groups[0]["lr"] == lr_at(sched.recipe, 0)
    if name == "lars":
        assert (decayed[0]["momentum"], decayed[0]["trust_coefficient"], decayed[0]["eps"]) == (0.8, 0.01, 1e-9)
    if name in ("adamw", "sgd"):
        assert all("layer_adaptation" not in g for g in opt.param_groups)
    else:
        assert {g["layer_adaptation"] for g in opt.param_groups} == {True, False}


def test_build_passes_recipe_options_and_refuses_what_it_cannot_honour():
    opt, _ = build(Block(), make_recipe("lamb", max_grad_norm=1.0, bias_correction=False, nonfinite="skip",
                                        skip_adaptation_without_decay=True))
    group = opt.param_groups[0]
    assert group["max_grad_norm"] == 1.0 and group["bias_correction"] is False
    assert group["nonfinite"] == "skip" and group["skip_adaptation_without_decay"] is True
    with pytest.raises(ValueError, match=r"recipe\.optimizer has options that lamb does not take: trust_ratio_clip"):
        build(Block(), make_recipe("lamb", trust_ratio_clip=1.0))
    with pytest.raises(ValueError, match=r"recipe.optimizer.max_grad_norm is set but lans has no built-in"):
        build(Block(), make_recipe("lans", max_grad_norm=1.0))
    with pytest.raises(ValueError, match=r"recipe.optimizer.bias_correction is set but adamw always applies"):
        build(Block(), make_recipe("adamw", bias_correction=False))


# -- training ---------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        return self.out(self.body(x))


@pytest.mark.parametrize(("name", "lr"), [("lamb", 0.02), ("lans", 0.02), ("lars", 0.05), ("adamw", 0.01)])
def test_a_recipe_trains_a_model(name, lr):
    torch.manual_seed(0)
    model = Net()
    recipe = make_recipe(name, lr=lr, weight_decay=0.01, exclude_from_weight_decay=["bias"])
    opt, sched = build(model, recipe)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(256, 6)
    with torch.no_grad():
        y = teacher(x) * 3
    losses, lrs = [], []
    for step in range(recipe.total_steps * 3):  # past the end too: the LR stays at end_lr
        batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(lr == [lr_at(recipe, k)] * len(opt.param_groups) for k, lr in enumerate(lrs))
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    first = sum(losses[:4]) / 4
    assert final < 0.25 * first, (first, final)


@pytest.mark.parametrize("name", ["lamb", "lans", "lars"])
def test_a_training_script_resumed_mid_run_is_bit_identical(name):
    """Model, optimizer and scheduler checkpointed at step 9 of 20 (inside the first stage's decay)."""
    recipe = make_recipe(name, lr=0.02, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(recipe.total_steps)]

    def train(model, opt, sched, steps):
        for x, y in steps:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    torch.manual_seed(0)
    model = Net()
    opt, sched = build(model, recipe)
    train(model, opt, sched, data[:9])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    train(model, opt, sched, data[9:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # another initialisation: everything must come from the checkpoint
    resumed = Net()
    resumed.load_state_dict(ckpt["model"])
    opt2, sched2 = build(resumed, recipe)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(resumed, opt2, sched2, data[9:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_optimizer_table_describes_the_code():
    """scaling_rules.optimizers (pure Python) against the classes build() makes: every recipe optimizer
    has a row, every option it lists is a keyword of the class, and the flags match the signatures."""
    import importlib
    import inspect
    import typing

    from largebatch.scaling_rules.models import RecipeOptimizerName
    from largebatch.scaling_rules.optimizers import OPTIMIZERS, info, same_units

    assert {n for n, i in OPTIMIZERS.items() if i.recipe} == set(typing.get_args(RecipeOptimizerName))
    for about in OPTIMIZERS.values():
        module, cls_name = about.implementation.rsplit(".", 1)
        keywords = set(inspect.signature(getattr(importlib.import_module(module), cls_name)).parameters)
        assert about.options <= keywords, (about.name, about.options - keywords)
        assert ("max_grad_norm" in keywords) == about.clipping, about.name
        assert ("trust_coefficient" in keywords) == about.trust_coefficient, about.name
        assert ("momentum" in keywords) == about.momentum, about.name
        assert ("betas" in keywords) == about.betas, about.name
    assert same_units("lamb", "lans") and same_units("adam", "adamw") and not same_units("lamb", "adamw")
    with pytest.raises(ValueError, match="unknown optimizer name: 'adagrad'"):
        info("adagrad")
