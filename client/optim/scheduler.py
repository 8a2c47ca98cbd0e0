"""`RecipeLR`: the LR schedule of a recipe as a torch LR scheduler.

It does not implement a schedule: every LR comes from ``largebatch.scaling_rules.schedule.lr_at``, the
one pure function the engine, the plots and the service also use, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from largebatch.scaling_rules.models import Recipe
from largebatch.scaling_rules.schedule import lr_at

__all__ = ["RecipeLR"]


class RecipeLR(LRScheduler):
    """Sets every group's LR to ``lr_at(recipe, step)``, ``step`` being the number of optimizer steps done.

    Call ``scheduler.step()`` after each ``optimizer.step()``, as with any torch scheduler: the k-th
    optimizer step (0-based) then runs with ``lr_at(recipe, k)``, across stage boundaries and past the
    end (the last stage's ``end_lr``).

    ``state_dict()`` holds the step count and the recipe's fingerprint; loading a checkpoint of another
    recipe raises, and loading re-applies the LR of the restored step, whatever the order in which the
    optimizer and the scheduler are restored.
    """

    def __init__(self, optimizer: Optimizer, recipe: Recipe | dict[str, Any], last_epoch: int = -1):
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
        if not self.recipe.stages:
            raise ValueError("recipe has no stages")
        self.recipe_fingerprint = self.recipe.fingerprint()
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        lr = lr_at(self.recipe, max(self.last_epoch, 0))
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("recipe", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("recipe_fingerprint")
        if saved is not None and saved != self.recipe_fingerprint:
            raise ValueError(
                "RecipeLR.load_state_dict(): the checkpoint follows another recipe "
                f"(fingerprint {saved[:12]}…, this scheduler's is {self.recipe_fingerprint[:12]}…); "
                "resuming would jump to a different LR curve"
            )
        state = {k: v for k, v in state_dict.items() if k != "recipe"}
        super().load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self._get_closed_form_lr(), strict=True):
            if isinstance(group["lr"], Tensor):  # capturable: a CUDA graph reads this very tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(group["lr"]) for group in self.optimizer.param_groups]
