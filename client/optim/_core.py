"""The base of LAMB, LANS and LARS: validation hooks, lazy state, the step's driver, and the
state_dict fix-up for fp32 state of bf16/fp16 parameters.

Its parts live beside it, along their seams: :mod:`._checks` (hyperparameter validation),
:mod:`._prologue` (gradient norms, the non-finite check and clipping, once per step), :mod:`._paths`
(which code path a group takes) and :mod:`._tensors` (accurate norms, trust ratios, DTensor shards,
chunking and scratch buffers), re-exported here for the optimizers.

Per-tensor scalars (norms, trust ratios, bias corrections, step sizes) are kept as float64 tensors on
the parameters' device: they are tiny, exact enough for the float64 tests, and never leave the device
(no ``.item()``).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import (
    DEFAULT_NONFINITE,
    check_betas,
    check_bool,
    check_capturable,
    check_common_options,
    check_lr,
    check_max_grad_norm,
    check_nonfinite,
    check_nonnegative,
)
from ._paths import (
    fused_slow,
    fused_subgroups,
    group_by_device_dtype,
    increment_steps,
    pick_path,
    run_group,
    where_ok,
)
from ._prologue import NonFiniteGradientError, Prologue, fused_sq_norms, run_prologue
from ._tensors import (
    LOW_PRECISION,
    NormReducer,
    RowsReducer,
    Scratch,
    chunk_indices,
    compute_dtype,
    fused_kernel_ok,
    fused_layout_ok,
    is_dense,
    is_dtensor,
    local,
    reject_flat_parameters,
    sq_norm,
    sq_norms,
    stack_scalars,
    steps_for_bias_correction,
    trust_ratios,
)

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "DEFAULT_NONFINITE",
    "LOW_PRECISION",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
    "NormReducer",
    "Prologue",
    "RowsReducer",
    "Scratch",
    "check_betas",
    "check_bool",
    "check_capturable",
    "check_common_options",
    "check_lr",
    "check_max_grad_norm",
    "check_nonfinite",
    "check_nonnegative",
    "chunk_indices",
    "compute_dtype",
    "fused_kernel_ok",
    "fused_layout_ok",
    "fused_slow",
    "fused_subgroups",
    "group_by_device_dtype",
    "increment_steps",
    "is_dense",
    "is_dtensor",
    "local",
    "pick_path",
    "run_group",
    "run_prologue",
    "sq_norm",
    "sq_norms",
    "stack_scalars",
    "steps_for_bias_correction",
    "trust_ratios",
    "where_ok",
]

# Elements per chunk of the multi-tensor path: the tensors of one chunk go through every pass of the
# update while they are still in cache, and the update direction lives in a reusable scratch buffer.
DEFAULT_CHUNK_NUMEL = 1 << 21


class LayerwiseOptimizer(Optimizer):
    """Base of LAMB, LANS and LARS: validation, lazy state, the prologue and fp32 state for bf16.

    Everything that changes the math is a param-group entry, so it is saved in ``state_dict()``.
    Subclasses define ``_validate_group(group)``, ``_state_keys`` (fp32 state tensors per parameter)
    and ``_step_group(...)``.
    """

    _state_keys: tuple[str, ...] = ()
    _owner = "LayerwiseOptimizer"

    def __init__(self, params: Any, defaults: dict[str, Any]):
        self._scratch = Scratch()
        self._fused_cache: Any = None
        super().__init__(params, defaults)

    # -- construction -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        self._validate_group(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        reject_flat_parameters(params, self._owner)
        for p in params:
            if not isinstance(p, Tensor) or not p.is_floating_point():
                what = p.dtype if isinstance(p, Tensor) else type(p).__name__
                if isinstance(p, Tensor) and p.is_complex():
                    raise ValueError(f"{self._owner} does not support complex parameters (got {what})")
                raise ValueError(f"{self._owner} needs floating-point parameters (got {what})")
        if merged.get("fused") and merged.get("foreach") is False:
            raise ValueError("fused=True needs the multi-tensor path; it cannot be combined with foreach=False")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        device = local(params[0]).device if params else torch.device("cpu")
        if group.get("capturable"):
            # A CUDA graph replays the LR it captured: it must be read from device memory, which the
            # LR schedulers update in place (``fill_``) when ``lr`` is a tensor.
            lr = group["lr"]
            group["lr"] = (lr.detach().to(device=device, dtype=torch.float64).clone() if isinstance(lr, Tensor)
                           else torch.tensor(float(lr), dtype=torch.float64, device=device))
        if self.param_groups[0] is not group:  # one counter, shared by every group
            group["skipped_steps"] = self.param_groups[0]["skipped_steps"]
        else:
            group.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64, device=device))

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_scratch"):
            self._scratch = Scratch()
        if not hasattr(self, "_fused_cache"):
            self._fused_cache = None
        for group in self.param_groups:
            group.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_scratch", None)
        state.pop("_fused_cache", None)
        return state

    # -- state ----------------------------------------------------------------------------------
    @property
    def skip_counter(self) -> Tensor:
        """Steps skipped because of non-finite gradients, as a 0-d int64 tensor on the parameters'
        device, updated in place by ``step()`` without a host sync (read it when you log)."""
        if not self.param_groups:
            return torch.zeros((), dtype=torch.int64)
        return self.param_groups[0]["skipped_steps"]

    @property
    def skipped_steps(self) -> int:
        """``skip_counter`` as a Python int. Reading it synchronises with the device."""
        return int(self.skip_counter)

    def extra_memory_bytes(self) -> int:
        """Bytes held beyond parameters, gradients and saved state: the scratch buffers."""
        return self._scratch.nbytes()

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Step counters are 0-d tensors on the parameter's device: incrementing them, and skipping
            # an increment, needs no host sync. fp32 moments for bf16/fp16 parameters.
            state["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
            for key in self._state_keys:
                state[key] = torch.zeros_like(p, dtype=compute_dtype(p.dtype), memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating-point state to the parameter dtype (bf16 moments would lose precision
        # and a resumed run would diverge) and leaves `step` where it was saved: undo both.
        super().load_state_dict(state_dict)
        if self.param_groups:  # one counter for all groups, back on the parameters' device
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = local(first).device if first is not None else torch.device("cpu")
            counter = self.param_groups[0].get("skipped_steps")
            counter = (counter.to(device=device, dtype=torch.int64, copy=True) if isinstance(counter, Tensor)
                       else torch.zeros((), dtype=torch.int64, device=device))
            for group in self.param_groups:
                group["skipped_steps"] = counter
                if group.get("capturable") and not isinstance(group["lr"], Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64, device=device)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state = self.state[p]
            for key in self._state_keys:
                value = saved.get(key)
                if isinstance(value, Tensor):
                    state[key] = value.to(device=p.device, dtype=compute_dtype(p.dtype), copy=True)
            step = saved.get("step")
            if isinstance(step, Tensor):
                state["step"] = step.to(device=local(p).device, dtype=torch.float32, copy=True)
            elif step is not None:
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=local(p).device)

    # -- step -----------------------------------------------------------------------------------
    def _gather(self) -> tuple[list[list[Tensor]], list[list[Tensor]], list[list[str]]]:
        params, grads, names = [], [], []
        for group in self.param_groups:
            ps, gs, ns = [], [], []
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self._owner} does not support sparse gradients")
                ps.append(p)
                gs.append(p.grad)
                ns.append(group_names[i] if group_names else "")
            params.append(ps)
            grads.append(gs)
            names.append(ns)
        return params, grads, names

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Performs a single optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, names = self._gather()
        paths = [pick_path(group.get("foreach"), group.get("fused", False), ps)
                 for group, ps in zip(self.param_groups, params, strict=True)]
        used = [path for path, ps in zip(paths, params, strict=True) if ps]
        fused_norms = None
        if used and all(path == "fused" for path in used):
            fused_norms = self._fused_sq_norms
        clips = "max_grad_norm" in self.defaults  # LAMB only: LANS and LARS never clip
        prologue = run_prologue(
            self._owner, params, grads, names=names, nonfinite=self._check_consistent_nonfinite(),
            max_grad_norm=[g["max_grad_norm"] if clips else None for g in self.param_groups], norms=fused_norms,
        )
        for gi, group in enumerate(self.param_groups):
            if params[gi]:
                states = [self._init_state(p) for p in params[gi]]
                self._step_group(group, params[gi], grads[gi], states, prologue, gi, paths[gi])
        self._count_skip(prologue.ok)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]], prologue: Prologue, gi: int,
                    path: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def fused_cache(self) -> Any:
        if self._fused_cache is None:
            from ._fused import FusedCache

            self._fused_cache = FusedCache()
        return self._fused_cache

    def _fused_sq_norms(self, tensors: list[Tensor]) -> Tensor:
        return fused_sq_norms(tensors, self.fused_cache())

    def _check_consistent_nonfinite(self) -> str:
        modes = {g["nonfinite"] for g in self.param_groups}
        if len(modes) > 1:
            raise ValueError(f"all parameter groups must use the same nonfinite mode, got {sorted(modes)}")
        return modes.pop() if modes else DEFAULT_NONFINITE

    def _count_skip(self, ok: Tensor | None) -> None:
        if ok is None or not self.param_groups:
            return
        counter = self.param_groups[0]["skipped_steps"]
        if counter.device != ok.device:  # (a counter loaded on another device; moved once)
            counter = counter.to(ok.device)
            for group in self.param_groups:
                group["skipped_steps"] = counter
        counter.add_((~ok).to(counter.dtype))
