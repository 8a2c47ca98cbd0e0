"""Machinery shared by LAMB, LANS and LARS.

* validation of hyperparameters with torch-style messages;
* the step *prologue*, run once per ``step()`` over every parameter group: full-tensor squared norms
  of the gradients (reduced across shards for DTensor parameters), the non-finite gradient check, and
  the global gradient-norm clip factor;
* accurate squared norms (float64 sums of fp32 row norms) and the :class:`NormReducer` that turns
  norms of DTensor shards into norms of full tensors;
* trust ratios, chunking, scratch buffers, and the state_dict fix-up for fp32 state of bf16/fp16
  parameters.

Per-tensor scalars (norms, trust ratios, bias corrections, step sizes) are kept as float64 tensors on
the parameters' device: they are tiny, exact enough for the float64 tests, and never leave the device
(no ``.item()``). The default ``nonfinite="skip"`` decides on the device whether a step is applied;
the opt-in ``nonfinite="raise"`` reads that decision on the host, which synchronises.

Code paths (``foreach``/``fused``, as in ``torch.optim``): ``fused`` is the multi-tensor kernel pair
(:mod:`._fused`: Triton, the default on CUDA when Triton is importable; on CPU, opt-in, the C kernels
of :mod:`._cpu_fused`), ``foreach`` the ``torch._foreach_*`` path (the default elsewhere), ``single``
the per-tensor reference loop (``foreach=False``).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

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

try:  # torch >= 2.4 exposes DTensor here; older builds or builds without distributed do not.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "LOW_PRECISION",
    "NonFiniteGradientError",
    "NormReducer",
    "RowsReducer",
    "Scratch",
    # re-exported from ._tensors for the optimizers
    "chunk_indices",
    "compute_dtype",
    "fused_kernel_ok",
    "fused_layout_ok",
    "is_dense",
    "is_dtensor",
    "local",
    "reject_flat_parameters",
    "sq_norm",
    "sq_norms",
    "stack_scalars",
    "steps_for_bias_correction",
    "trust_ratios",
]

NONFINITE_MODES = ("raise", "skip")
DEFAULT_NONFINITE = "skip"
# Elements per chunk of the multi-tensor path: the tensors of one chunk go through every pass of the
# update while they are still in cache, and the update direction lives in a reusable scratch buffer.
DEFAULT_CHUNK_NUMEL = 1 << 21


class NonFiniteGradientError(FloatingPointError):
    """A gradient contains NaN or Inf; raised by ``step()`` before any state or parameter changes."""


# ----------------------------------------------------------------------------------------------
# validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = float(lr.detach().cpu())
    elif _is_number(lr):
        lr_value = float(lr)
    else:
        raise TypeError(f"Invalid learning rate: {lr!r} (expected a float)")
    if not math.isfinite(lr_value) or lr_value < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonnegative(name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name} value: {value}")


def check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected True or False)")


def check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (expected None, True or False)")


def check_phi_bounds(bounds: Any) -> None:
    if bounds is None:
        return
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or not all(_is_number(b) and math.isfinite(b) for b in bounds)
        or not 0.0 <= bounds[0] <= bounds[1]
        or bounds[1] == 0.0
    ):
        raise ValueError(f"Invalid phi_bounds: {bounds!r} (expected None or (lower, upper) with 0 <= lower <= upper, upper > 0)")


def check_nonfinite(mode: Any) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"Invalid nonfinite mode: {mode!r} (expected 'raise' or 'skip')")


# ----------------------------------------------------------------------------------------------
# sharded parameters


@dataclass
class Prologue:
    """What every group's update needs from the whole-optimizer pass at the start of ``step()``."""

    g_sq: list[Tensor]  # per group: full ||g||^2 of each parameter with a gradient (1-D float64)
    ok: Tensor | None  # 0-d bool: the step is applied (skip mode only; None in raise mode)
    clip: list[Tensor | None]  # per group: divide gradients by this (global norm clipping), or None


def _first_device(groups: list[list[Tensor]]) -> torch.device | None:
    for tensors in groups:
        for t in tensors:
            return local(t).device
    return None


def run_prologue(
    owner: str,
    params: list[list[Tensor]],
    grads: list[list[Tensor]],
    *,
    max_grad_norm: list[float | None],
    nonfinite: str,
    names: list[list[str]] | None = None,
    norms: Callable[[list[Tensor]], Tensor] | None = None,
) -> Prologue:
    """Full-tensor gradient norms, the non-finite check and the clip factors.

    The local squared norms go through one reduction per (mesh, sharded dims), so under FSDP2 all ranks
    agree on the norms, on the clip factor and on whether the step is skipped. (Parameter norms are
    taken later, chunk by chunk, while the parameters are in cache.)
    """
    flat_g = [g for gs in grads for g in gs]
    device = _first_device(params)
    if device is None:
        return Prologue([torch.zeros(0, dtype=torch.float64) for _ in params], None, [None for _ in params])

    norm_fn = norms or sq_norms
    locals_ = [local(g) for g in flat_g]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, g in enumerate(locals_):
        by_device[g.device].append(i)
    if len(by_device) == 1:
        g_local = norm_fn(locals_)
    else:  # gather the per-device norms on the first device, in order
        values: list[Tensor] = [torch.zeros((), dtype=torch.float64, device=device)] * len(locals_)
        for idx in by_device.values():
            for i, value in zip(idx, norm_fn([locals_[i] for i in idx]).to(device).unbind(), strict=True):
                values[i] = value
        g_local = torch.stack(values)
    g_full = NormReducer(flat_g)(g_local)
    total = g_full.sum()
    finite = torch.isfinite(total)
    ok: Tensor | None = None
    if nonfinite == "raise":
        # The opt-in debugging mode: an exception needs a Python bool, so this synchronises.
        if not bool(finite):
            raise NonFiniteGradientError(_nonfinite_message(owner, params, g_full, names))
    else:
        ok = finite

    clip: list[Tensor | None] = []
    global_norm = total.sqrt()
    for max_norm in max_grad_norm:
        if max_norm is None:
            clip.append(None)
        else:
            factor = torch.clamp(global_norm / max_norm, min=1.0)
            if ok is not None:
                factor = torch.where(ok, factor, torch.ones_like(factor))
            clip.append(factor)

    def regroup(flat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for ps in params:
            out.append(flat[start : start + len(ps)])
            start += len(ps)
        return out

    return Prologue(regroup(g_full), ok, clip)


def _nonfinite_message(owner: str, params: list[list[Tensor]], g_sq: Tensor,
                       names: list[list[str]] | None) -> str:
    bad: list[str] = []
    finite = torch.isfinite(g_sq).tolist()
    k = 0
    for gi, ps in enumerate(params):
        for pi, p in enumerate(ps):
            if not finite[k]:
                label = names[gi][pi] if names and names[gi] and names[gi][pi] else f"group {gi}, parameter {pi}"
                bad.append(f"{label} {tuple(p.shape)}")
            k += 1
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (
        f"{owner}.step(): non-finite gradient (NaN or Inf) in {shown}; no parameter or optimizer state "
        "was changed. Fix the loss, or use the default nonfinite='skip' to skip such steps on the device."
    )


# ----------------------------------------------------------------------------------------------
# the optimizer base class


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


def check_common_options(group: dict[str, Any]) -> None:
    """The options every layer-wise optimizer shares (``fused`` where it has one)."""
    check_bool("layer_adaptation", group["layer_adaptation"])
    check_phi_bounds(group["phi_bounds"])
    check_nonfinite(group["nonfinite"])
    check_optional_bool("foreach", group["foreach"])
    if "fused" in group:
        check_optional_bool("fused", group["fused"])
    if "capturable" in group:
        check_capturable(group)


_MULTI_ONLY = ("scratch", "chunk_numel", "torch_fused_adam")


def run_group(multi_tensor: Callable[..., None], single_tensor: Callable[..., None],
              fused: Callable[..., None] | None, *tensors: list[Tensor], path: str, **kw: Any) -> None:
    """One group's update by the path :func:`pick_path` chose. Only the foreach path takes
    ``scratch``, ``chunk_numel`` and ``torch_fused_adam``; only the fused one takes ``cache``."""
    cache = kw.pop("cache", None)
    if path == "foreach":
        multi_tensor(*tensors, **kw)
        return
    for key in _MULTI_ONLY:
        kw.pop(key, None)
    if path == "fused":
        assert fused is not None
        fused(*tensors, cache=cache, **kw)
    else:
        single_tensor(*tensors, **kw)


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_path(foreach: bool | None, fused: bool | None, tensors: Sequence[Tensor]) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"``, as ``torch.optim`` chooses: ``fused=None`` means the
    fused kernel when every tensor is on CUDA and Triton is importable (never while ``torch.compile``
    traces the step: the foreach path compiles); ``fused=True`` (CUDA, or CPU: the C kernels) raises
    where it cannot run;
    ``foreach=False`` is the single-tensor reference."""
    if fused:
        if foreach is False:
            raise ValueError("fused=True needs the multi-tensor path; it cannot be combined with foreach=False")
        from ._fused import fused_unavailable_reason

        for device in {local(t).device for t in tensors}:
            reason = fused_unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"fused=True cannot run on {device.type} tensors: {reason}")
        return "fused"
    if foreach is False:
        return "single"
    if (fused is None and tensors and not torch.compiler.is_compiling()
            and all(local(t).device.type == "cuda" for t in tensors) and triton_importable()):
        return "fused"
    return "foreach"


def fused_sq_norms(tensors: list[Tensor], cache: Any) -> Tensor:
    """:func:`sq_norms` by the fused path's Triton kernel (tensors with a gap in memory: torch)."""
    from ._fused import sumsq_fused

    dense = [i for i, t in enumerate(tensors) if is_dense(t)]
    if len(dense) == len(tensors):
        return sumsq_fused(tensors, cache)
    values: list[Tensor] = [torch.zeros((), dtype=torch.float64, device=tensors[0].device)] * len(tensors)
    if dense:
        for i, value in zip(dense, sumsq_fused([tensors[i] for i in dense], cache).unbind(), strict=True):
            values[i] = value
    for i, t in enumerate(tensors):
        if not is_dense(t):
            values[i] = sq_norm(t)
    return torch.stack(values)


def fused_takes(device: torch.device, *operands: Tensor) -> bool:
    """Whether one parameter's operands (local tensors) can go to the fused kernels: one dense layout,
    and dtypes the kernels of ``device`` have."""
    from ._fused import kernel_takes

    return fused_layout_ok(*operands) and kernel_takes(device, *operands)


def check_capturable(group: dict[str, Any]) -> None:
    check_bool("capturable", group["capturable"])


def group_by_device_dtype(n: int, tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i in range(n):
        t = local(tensors[i])
        out[(t.device, t.dtype)].append(i)
    return out


def fused_subgroups(params: Sequence[Tensor], grads: Sequence[Tensor]
                    ) -> dict[tuple[torch.device, tuple[torch.dtype, torch.dtype]], list[int]]:
    """Indices by (device, (parameter dtype, gradient dtype)): one kernel launch each."""
    out: dict[tuple[torch.device, tuple[torch.dtype, torch.dtype]], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        lp = local(p)
        out[(lp.device, (lp.dtype, local(grads[i]).dtype))].append(i)
    return out


def where_ok(ok: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    """``value`` where the step is applied, else 1 (the multiplier that leaves a moment unchanged),
    exactly in ``dtype`` (``torch.where`` with a Python float would round it to float32)."""
    return torch.where(ok, torch.full((), value, dtype=dtype, device=ok.device), 1.0)


def increment_steps(steps: list[Tensor], ok: Tensor | None) -> None:
    """``step += 1``, or ``+= ok`` in skip mode, without reading anything on the host."""
    if ok is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, [ok.to(torch.float32)] * len(steps))  # (the Tensor overload calls .item())


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Substring match (as in BERT's ``no_decay`` list), or fnmatch when the pattern has wildcards."""
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif pattern in name:
            return True
    return False
