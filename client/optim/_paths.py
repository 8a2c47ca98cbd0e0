"""Which code path a group's step takes (``fused``, ``foreach`` or ``single``, as ``torch.optim``
names them) and the helpers the paths share.

``fused`` is the multi-tensor kernel pair (:mod:`._fused`: Triton on CUDA; on CPU the C kernels of
:mod:`._cpu_fused`), the default wherever it runs natively; ``foreach`` the ``torch._foreach_*`` path,
the fallback; ``single`` the per-tensor reference loop (``foreach=False``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._tensors import fused_layout_ok, local

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


_log = logging.getLogger("largebatch.client.optim")


@functools.cache  # one line per process and cause, not one per step
def _fall_back(device_type: str, reason: str) -> None:
    _log.warning("LAMB/LANS: the fused kernels cannot run on %s tensors (%s); using the foreach path",
                 device_type, reason)


def _auto_fused(tensors: Sequence[Tensor]) -> bool:
    """``fused=None``: the fastest exact path of the tensors' one device type, the fused kernels, where
    they run natively (CUDA with Triton; CPU with the C kernels, for their dtypes); never the Triton
    interpreter, a test tool, and never while ``torch.compile`` traces (the foreach path compiles)."""
    if not tensors or torch.compiler.is_compiling():
        return False
    kinds = {local(t).device.type for t in tensors}
    if kinds == {"cuda"}:
        if triton_importable():
            return True
        _fall_back("cuda", "Triton is not installed")
        return False
    if kinds != {"cpu"}:
        return False
    from . import _cpu_fused, _fused

    if not _fused.cpu_is_c() or any(local(t).dtype not in _cpu_fused.DTYPES for t in tensors):
        return False
    reason = _cpu_fused.unavailable_reason()
    if reason is not None:
        _fall_back("cpu", reason)
    return reason is None


def pick_path(foreach: bool | None, fused: bool | None, tensors: Sequence[Tensor]) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"``, as ``torch.optim`` names them: ``fused=None`` (the
    default) means the fused kernels wherever they run natively (see :func:`_auto_fused`), else the
    foreach path, with one log line when a compiler or Triton is missing; ``fused=True`` (CUDA, or
    CPU: the C kernels) raises where it cannot run; ``foreach=False`` is the single-tensor reference."""
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
    if fused is None and _auto_fused(tensors):
        return "fused"
    return "foreach"



def fused_slow(device: torch.device, operands: Sequence[Sequence[Tensor]]) -> list[int]:
    """Positions whose operands (local tensors, one list per operand: parameters, gradients, moments)
    the fused kernels of ``device`` cannot take: a layout other than one dense layout, or a dtype they
    lack. (Asked on every step: the dtype answer is looked up once per combination.)"""
    from ._fused import kernel_takes

    known: dict[tuple[torch.dtype, ...], bool] = {}
    slow = []
    for k, ops in enumerate(zip(*operands, strict=True)):
        dtypes = tuple(t.dtype for t in ops)
        takes = known.get(dtypes)
        if takes is None:
            takes = known[dtypes] = kernel_takes(device, *ops)
        if not (takes and fused_layout_ok(*ops)):
            slow.append(k)
    return slow


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
