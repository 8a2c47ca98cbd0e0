"""The fused multi-tensor path of LAMB and LANS: Triton kernels over every tensor of a group at once.

A group's tensors are described to the kernels by tables of addresses (one per operand: parameters,
gradients, ``exp_avg``, ``exp_avg_sq``) and a table of chunks (tensor index, start offset): one
program updates ``BLOCK`` elements of one tensor, so a handful of launches cover the whole model, as
apex's ``multi_tensor_apply`` does. The tables depend only on addresses and sizes; they are built once
and cached (a step whose tensors sit where they sat before copies nothing to the device).

The passes, each one launch per (group, dtypes):

* ``sumsq``: per-tensor ``||g||^2`` (the step's prologue: the on-device non-finite test, the global
  clip and LANS's normalisation), fp32 partial sums per program added atomically in float64;
* pass 1: reads ``p, g, m, v``, writes the new ``m, v`` and adds each tensor's ``||u||^2`` and
  ``||p||^2`` (LANS: ``||r||^2`` and ``||c||^2``) atomically;
* between the passes nothing runs, except for sharded (DTensor) parameters, whose norms are summed
  over the ranks there;
* pass 2: each program computes its tensor's trust ratio from those norms and the LR (a device
  tensor: no host synchronisation), reads ``p, m, v`` (LANS also ``g``), recomputes the update and
  writes ``p``.

The update is recomputed in pass 2 rather than stored: that moves ~10 words per parameter (fused
AdamW moves 7). fp32 division and square root use ``div_rn``/``sqrt_rn`` (correctly rounded; plain
``/`` and ``sqrt`` are approximate on NVIDIA GPUs); float64 ones are correctly rounded already.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is first imported), which is how it is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import _triton_kernels as _k
from ._tensors import sq_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "FusedCache",
    "cpu_backend",
    "fused_available",
    "fused_unavailable_reason",
    "kernel_takes",
    "lamb_fused",
    "lans_fused",
    "sumsq_fused",
]

# Elements per program. On the GPU a program is one block of 8 warps; under the interpreter every
# program costs ~1 ms of Python, so it takes big blocks (numpy does the work).
_BLOCK_CUDA = 4096
_BLOCK_INTERPRETED = 1 << 14
_WARPS = 8
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_on() -> bool:
    return triton is not None and _INTERPRETED


# Which kernels the fused path runs on CPU tensors: "c" (:mod:`._cpu_fused`) or "triton" (under the
# interpreter). None: Triton where TRITON_INTERPRET is set (tests), C otherwise.
_CPU_BACKEND: str | None = None


@contextlib.contextmanager
def cpu_backend(name: str | None) -> Iterator[None]:
    """Run the fused path's CPU steps on ``"c"`` or ``"triton"`` kernels inside the block (tests run
    both on CPU; None keeps the default)."""
    if name not in (None, "c", "triton"):
        raise ValueError(f"Invalid cpu_backend: {name!r} (expected 'c', 'triton' or None)")
    global _CPU_BACKEND
    before, _CPU_BACKEND = _CPU_BACKEND, name or _CPU_BACKEND
    try:
        yield
    finally:
        _CPU_BACKEND = before


def cpu_is_c() -> bool:
    """Whether the fused path runs the C kernels on CPU tensors (else Triton's interpreter)."""
    return (_CPU_BACKEND or ("triton" if _INTERPRETED else "c")) == "c"


def fused_unavailable_reason(device: torch.device) -> str | None:
    """Why the fused path cannot run on ``device``, or None when it can. On CPU it is the C kernels of
    :mod:`._cpu_fused` (the Triton kernels under Triton's interpreter, which is how tests run them)."""
    if device.type == "cpu" and cpu_is_c():
        from . import _cpu_fused

        return _cpu_fused.unavailable_reason()
    if triton is None:
        return "Triton is not installed (pip install triton; it ships with the CUDA builds of torch)"
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRETED):
        return None
    if device.type == "cpu":
        return ("its Triton kernels run on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1, "
                "set before largebatch is imported)")
    return f"its Triton kernels do not run on {device.type} tensors"


def _cpu_kernels(device: torch.device):
    """The C kernels' module where they serve ``device`` (CPU, not interpreted), else None."""
    if device.type == "cpu" and cpu_is_c():
        return _cpu_module()
    return None


@functools.cache  # (asked per tensor on every step: an import statement each time costs more than the test)
def _cpu_module():
    from . import _cpu_fused

    return _cpu_fused


def kernel_takes(device: torch.device, *operands: Tensor) -> bool:
    """Whether the fused kernels take these operands' dtypes (the Triton ones take every float dtype)."""
    cpu = _cpu_kernels(device)
    return cpu is None or cpu.takes(*operands)


def fused_available(device: torch.device) -> bool:
    return fused_unavailable_reason(device) is None


def _block(device: torch.device, numels: Sequence[int]) -> int:
    if device.type == "cuda":
        return _BLOCK_CUDA
    # interpreted: a block no bigger than the largest tensor (numpy works on whole blocks, masked or not)
    return min(_BLOCK_INTERPRETED, triton.next_power_of_2(max(max(numels, default=1), 16)))


# ----------------------------------------------------------------------------------------------
# tables


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":  # a pinned, asynchronous copy: no host synchronisation
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class _Layout:
    """Address and chunk tables of one list of tensor operands on one device."""

    def __init__(self, operands: Sequence[Sequence[Tensor]], device: torch.device, block: int):
        numels = [t.numel() for t in operands[0]]
        self.ptrs = [_to_device([t.data_ptr() for t in op], torch.int64, device) for op in operands]
        self.numels = _to_device(numels, torch.int64, device)
        chunk_tensor: list[int] = []
        chunk_start: list[int] = []
        for i, n in enumerate(numels):
            for start in range(0, n, block):
                chunk_tensor.append(i)
                chunk_start.append(start)
        self.n_chunks = len(chunk_tensor)
        self.block = block
        self.chunk_tensor = _to_device(chunk_tensor, torch.int32, device)
        self.chunk_start = _to_device(chunk_start, torch.int64, device)


class FusedCache:
    """Tables and constants reused from step to step (not optimizer state: rebuilt on demand)."""

    def __init__(self, size: int = 16):
        self._layouts: OrderedDict[tuple, _Layout] = OrderedDict()
        self._constants: dict[tuple, Tensor] = {}
        self._size = size

    def layout(self, operands: Sequence[Sequence[Tensor]], device: torch.device) -> _Layout:
        numels = tuple(t.numel() for t in operands[0])
        block = _block(device, numels)
        key = (device, block, numels,
               tuple(tuple(t.data_ptr() for t in op) for op in operands))
        found = self._layouts.get(key)
        if found is None:
            found = _Layout(operands, device, block)
            self._layouts[key] = found
            if len(self._layouts) > self._size:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return found

    def constants(self, values: Sequence[float], device: torch.device) -> Tensor:
        """Hyperparameters as a float64 device tensor (kernel float arguments would be fp32)."""
        key = (device, tuple(values))
        found = self._constants.get(key)
        if found is None:
            found = _to_device_f64(list(values), device)
            self._constants[key] = found
        return found


def _to_device_f64(values: list[float], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def _compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# kernels: device code in _triton_kernels (defined where Triton is importable)


def _launch_kwargs(device: torch.device) -> dict:
    return {"num_warps": _WARPS} if device.type == "cuda" else {}


# ----------------------------------------------------------------------------------------------
# entry points (tensors: local, dense, on one device; the caller groups them)


def sumsq_fused(tensors: Sequence[Tensor], cache: FusedCache) -> Tensor:
    """Per-tensor squared norms as a 1-D float64 tensor (one launch per dtype)."""
    device = tensors[0].device
    cpu = _cpu_kernels(device)
    out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    parts = []
    for dtype, idx in by_dtype.items():
        members = [tensors[i] for i in idx]
        if cpu is not None:
            parts.append((idx, cpu.sumsq(members) if cpu.takes(members[0]) else torch.stack(
                [sq_norm(t) for t in members])))
            continue
        layout = cache.layout([members], device)
        part = out if len(idx) == len(tensors) else torch.zeros(len(idx), dtype=torch.float64, device=device)
        if layout.n_chunks:
            _k._sumsq_kernel[(layout.n_chunks,)](
                layout.ptrs[0], layout.numels, layout.chunk_tensor, layout.chunk_start, part,
                BLOCK=layout.block, G_DT=_tl_dtype(dtype), C_DT=_compute(dtype), **_launch_kwargs(device))
        parts.append((idx, part))
    if len(parts) == 1:
        return parts[0][1]
    values: list[Tensor] = [out[0]] * len(tensors)
    for idx, part in parts:
        for k, i in enumerate(idx):
            values[i] = part[k]
    return torch.stack(values)


def _common(params, grads, exp_avgs, device, cache, beta1, beta2, eps, weight_decay, phi_bounds):
    layout = cache.layout([params, grads, exp_avgs[0], exp_avgs[1]], device)
    lo, hi = phi_bounds if phi_bounds is not None else (0.0, 0.0)
    hp = cache.constants((beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, lo, hi, 1.0), device)
    return layout, hp


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """``lr`` as a 0-d float64 tensor on ``device``: a capturable LR as it is (a CUDA graph reads it
    there), a float by one fill (no copy from the host, hence no synchronisation)."""
    if isinstance(lr, Tensor) and lr.device == device:
        return lr if lr.dtype == torch.float64 else lr.to(torch.float64)
    return torch.full((), float(lr), dtype=torch.float64, device=device)


def lamb_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               *, bc1: Tensor, bc2: Tensor, ok: Tensor | None, clip: Tensor | None, lr: float | Tensor,
               beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
               phi_bounds: tuple[float, float] | None, cache: FusedCache, reduce: Callable | None) -> None:
    """One LAMB update. ``reduce(x_sq, u_sq)``, when given, turns pass 1's local squared norms into
    full-tensor ones in place (sharded tensors); pass 2 computes the trust ratios itself."""
    device = params[0].device
    if (cpu := _cpu_kernels(device)) is not None:
        cpu.lamb(params, grads, exp_avgs, exp_avg_sqs, bc1=bc1, bc2=bc2, ok=ok, clip=clip, lr=lr, beta1=beta1,
                 beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt,
                 phi_bounds=phi_bounds, reduce=reduce)
        return
    layout, hp = _common(params, grads, (exp_avgs, exp_avg_sqs), device, cache, beta1, beta2, eps,
                         weight_decay, phi_bounds)
    n = len(params)
    sq = torch.zeros(2, n, dtype=torch.float64, device=device)
    ok_i = ok.to(torch.int64) if ok is not None else layout.numels
    p_dt, g_dt = params[0].dtype, grads[0].dtype
    c_dt = torch.float64 if p_dt == torch.float64 else torch.float32
    common = dict(BLOCK=layout.block, P_DT=_tl_dtype(p_dt), C_DT=_tl_dtype(c_dt), F64=c_dt == torch.float64,
                  BIAS_CORRECTION=bias_correction, HAS_OK=ok is not None, ADAPT=adapt,
                  MANUAL_BF16=_INTERPRETED and p_dt == torch.bfloat16, **_launch_kwargs(device))
    if not layout.n_chunks:
        return
    _k._lamb_pass1[(layout.n_chunks,)](
        layout.ptrs[0], layout.ptrs[1], layout.ptrs[2], layout.ptrs[3], layout.numels, layout.chunk_tensor,
        layout.chunk_start, hp, bc1, bc2, ok_i, clip if clip is not None else sq, sq[0], sq[1],
        HAS_CLIP=clip is not None, G_DT=_tl_dtype(g_dt), **common)
    if adapt and reduce is not None:
        reduce(sq)
    _k._lamb_pass2[(layout.n_chunks,)](
        layout.ptrs[0], layout.ptrs[2], layout.ptrs[3], layout.numels, layout.chunk_tensor, layout.chunk_start,
        hp, bc1, bc2, ok_i, _lr_tensor(lr, device), sq[0], sq[1], PHI=phi_bounds is not None, **common)


def lans_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               *, g_norm: Tensor, bc1: Tensor, bc2: Tensor, ok: Tensor | None, lr: float | Tensor, beta1: float,
               beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
               phi_bounds: tuple[float, float] | None, cache: FusedCache, reduce: Callable | None) -> None:
    """One LANS update. ``g_norm``: per-tensor ``||g||`` (1 where 0); ``reduce`` as in :func:`lamb_fused`
    (on the three rows ``||x||^2, ||r||^2, ||c||^2``)."""
    device = params[0].device
    if (cpu := _cpu_kernels(device)) is not None:
        cpu.lans(params, grads, exp_avgs, exp_avg_sqs, g_norm=g_norm, bc1=bc1, bc2=bc2, ok=ok, lr=lr, beta1=beta1,
                 beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt,
                 phi_bounds=phi_bounds, reduce=reduce)
        return
    layout, hp = _common(params, grads, (exp_avgs, exp_avg_sqs), device, cache, beta1, beta2, eps,
                         weight_decay, phi_bounds)
    n = len(params)
    sq = torch.zeros(3, n, dtype=torch.float64, device=device)
    ok_i = ok.to(torch.int64) if ok is not None else layout.numels
    p_dt, g_dt = params[0].dtype, grads[0].dtype
    c_dt = torch.float64 if p_dt == torch.float64 else torch.float32
    g_norm = g_norm.to(c_dt)
    common = dict(BLOCK=layout.block, P_DT=_tl_dtype(p_dt), G_DT=_tl_dtype(g_dt), C_DT=_tl_dtype(c_dt),
                  F64=c_dt == torch.float64, BIAS_CORRECTION=bias_correction, HAS_OK=ok is not None, ADAPT=adapt,
                  MANUAL_BF16=_INTERPRETED and p_dt == torch.bfloat16, **_launch_kwargs(device))
    if not layout.n_chunks:
        return
    _k._lans_pass1[(layout.n_chunks,)](
        layout.ptrs[0], layout.ptrs[1], layout.ptrs[2], layout.ptrs[3], layout.numels, layout.chunk_tensor,
        layout.chunk_start, hp, bc1, bc2, ok_i, g_norm, sq[0], sq[1], sq[2], **common)
    if adapt and reduce is not None:
        reduce(sq)
    _k._lans_pass2[(layout.n_chunks,)](
        layout.ptrs[0], layout.ptrs[1], layout.ptrs[2], layout.ptrs[3], layout.numels, layout.chunk_tensor,
        layout.chunk_start, hp, bc1, bc2, ok_i, g_norm, _lr_tensor(lr, device), sq[0], sq[1], sq[2],
        PHI=phi_bounds is not None, **common)
