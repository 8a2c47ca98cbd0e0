"""The fused path on CPU: LAMB and LANS as two multi-threaded C loops over every tensor of a group.

On CPU, torch has no fused LAMB and Triton has no backend (its interpreter is a test tool), and the
``torch._foreach_*`` path makes ~15 memory passes per step where the algorithm needs 10. So the same
two passes as the Triton kernels of :mod:`._fused` are written in C (``_cpu_kernels.c``, shipped as
package data beside this module), compiled once per machine
with the system's C compiler (``cc``, or ``$CC``: the compiler ``torch.compile`` needs on CPU too) into
a cache folder, and called through :mod:`ctypes` with tables of tensor addresses:

* pass 1 reads ``p, g, m, v``, writes ``m, v`` and sums ``||p||^2`` and ``||u||^2`` (LANS: ``||r||^2``,
  ``||c||^2``) per tensor;
* pass 2 writes ``p``, the update scaled by the trust ratio, computed between the passes in float64 by
  :func:`._tensors.trust_ratios` (the foreach path's own function; in C, the same float64 operations,
  in the one-call path below). In the one-call path pass 1 keeps a batch's updates in a per-thread
  buffer (up to ``_KEEP`` elements) and pass 2 reads ``p`` and them; otherwise pass 2 recomputes the
  update from ``p, m, v`` (LANS also ``g``). The same operations either way: the same bits.

Unsharded parameters take both passes in one call: consecutive tensors in batches of up to ``_BATCH``
elements (a bigger tensor alone), each batch whole on one thread, its pass 2 right after its pass 1,
walking its blocks backwards, so that it reads ``p, m, v`` from cache where they still are; the threads
take the batches largest first, with no barrier between them (one would stall on every descheduled
thread of a busy machine). Where one tensor is more than a thread's share of the step, two calls split
every tensor's blocks among the threads instead (see :func:`_one_call`).
On CPU the step is bound by memory reads and by the divider: fused AdamW reads 4 words per parameter
and takes one square root and one division; LAMB reads 8 (the gradient-norm prologue 1, pass 1 4,
pass 2 3: p, m, v; or p and the kept update, which pass 1 wrote) for a tensor bigger than the cache,
LANS 9 (its pass 2 also reads ``g``, or reads two kept words), and recomputing the update in pass 2
takes the square root and the division again, which keeping it saves (the README's optimizer table
times both: ``benchmarks/optimizer_step.py --breakdown``). Sharded parameters keep the two calls,
their norms summed over the ranks in between.

The tensors are cut into blocks of ``_BLOCK`` elements that the threads share; each block's sums are
kept apart and added per tensor in block order, in float64, so the result does not depend on the
thread count or schedule. fp32 and fp64 tensors are supported (parameter, gradient and state of one
dtype); the optimizers send other dtypes and layouts to the reference path. The compiler gets no
``-ffast-math``: IEEE division and square root, as the other paths.

On CPU nothing synchronises: the non-finite decision of the prologue is read as a Python bool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._tensors import trust_ratios

_BLOCK = 1 << 14  # elements per work item: 64 KB of fp32 per operand, a few operands fit in L2
# elements per batch of small tensors (pass 2 follows each batch's pass 1; p, g, m, v of a batch stay in L3)
_BATCH = 1 << 18
# The one-call drivers keep a batch's updates (LAMB's u; LANS's r and c) in a per-thread buffer up to this
# many elements (16 MB per thread of fp32 for LAMB, 32 MB for LANS), so its pass 2 reads p and the update
# instead of recomputing it from p, m, v (and g): no second square root and division per element. A larger
# batch (one big tensor: an embedding) recomputes. 0 turns keeping off.
_KEEP = 1 << 22

_SOURCE_FILE = "_cpu_kernels.c"  # package data, beside this module

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
DTYPES = {torch.float32: "f32", torch.float64: "f64"}


def _compiler() -> str | None:
    return _which(os.environ.get("CC") or "cc")


@functools.cache  # (asked on every step: a PATH search each time would be wasted)
def _which(name: str) -> str | None:
    return shutil.which(name)


def _cache_dir() -> pathlib.Path:
    if os.environ.get("LARGEBATCH_CACHE_DIR"):
        return pathlib.Path(os.environ["LARGEBATCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "largebatch" / "kernels"


def _cpu_key() -> str:
    """-march=native code runs only where it was built: the key names the CPU it was built for."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    return _build(_compiler())


@functools.cache
def _build(cc: str | None) -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled kernels, built on first use (under a second) and cached; or why they cannot be."""
    if cc is None:
        return None, ("no C compiler found (set CC, or install gcc: the CPU kernels are compiled on first use, "
                      "as torch.compile's are)")
    source = (importlib.resources.files(__package__) / _SOURCE_FILE).read_text()
    flags = [*_FLAGS, f"-DBLOCK={_BLOCK}", f"-DBATCH_NUMEL={_BATCH}"]
    digest = hashlib.sha256("\0".join([source, cc, *flags, _cpu_key()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"largebatch_cpu_{digest}.so"
    if not target.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = pathlib.Path(tmp) / "kernels.c"
                src.write_text(source)
                out = pathlib.Path(tmp) / "kernels.so"
                done = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True,
                                      text=True, timeout=300)
                if done.returncode != 0:
                    return None, f"compiling the CPU kernels with {cc} failed: {done.stderr.strip()[-500:]}"
                os.replace(out, target)  # atomic: concurrent builders each install a whole file
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"compiling the CPU kernels failed: {exc}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"loading the CPU kernels from {target} failed: {exc}"
    return lib, None


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot run here, or None (builds them on the first call)."""
    return _library()[1]


def takes(*tensors: Tensor) -> bool:
    """Whether the kernels take these operands (one of their dtypes, all alike, dense, same layout)."""
    return tensors[0].dtype in DTYPES and all(t.dtype == tensors[0].dtype for t in tensors)


def _ptrs(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(dtype=torch.float64).reshape(-1).contiguous()


def _addr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib, reason = _library()
    if lib is None:
        raise RuntimeError(reason)
    getattr(lib, f"{name}_{DTYPES[dtype]}")(*args, ctypes.c_int(torch.get_num_threads()))


def _numels(tensors: Sequence[Tensor]) -> Tensor:
    return torch.tensor([t.numel() for t in tensors], dtype=torch.int64)


def _one_call(numel: Tensor) -> bool:
    """Whether the one-call driver fits: its batches go whole to one thread each, largest first, so the
    threads finish within one batch of each other; where the largest (one tensor) is more than a
    thread's share, the two calls split it instead."""
    threads = torch.get_num_threads()
    return threads == 1 or int(numel.max()) * threads <= int(numel.sum())


def sumsq(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor squared norms (one dtype), float64."""
    out = torch.zeros(len(tensors), dtype=torch.float64)
    numel = _numels(tensors)
    _call("lb_sumsq", tensors[0].dtype, ctypes.c_int64(len(tensors)), _ptrs(tensors), _addr(numel), _addr(out))
    return out


def _hp(beta1: float, beta2: float, eps: float, weight_decay: float, clip: float = 1.0) -> Tensor:
    return torch.tensor([beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, clip], dtype=torch.float64)


def _lr(lr: float | Tensor) -> Tensor:
    return _f64(lr) if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float64)


def _ratio(sq: Tensor, row: int, adapt: bool, phi_bounds: tuple[float, float] | None) -> Tensor:
    if not adapt:
        return torch.ones(sq.shape[1], dtype=torch.float64)
    return trust_ratios(sq[0], sq[row], phi_bounds)


def _lr_phi(lr: float | Tensor, phi_bounds: tuple[float, float] | None) -> Tensor:
    lo, hi = phi_bounds if phi_bounds is not None else (0.0, 0.0)
    return torch.cat([_lr(lr).reshape(1), torch.tensor([float(phi_bounds is not None), lo, hi],
                                                        dtype=torch.float64)])


def lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
         bc1: Tensor, bc2: Tensor, ok: Tensor | None, clip: Tensor | None, lr: float | Tensor, beta1: float,
         beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
         phi_bounds: tuple[float, float] | None, reduce: Callable | None) -> None:
    """One LAMB update of dense CPU tensors of one dtype (the interface of ``_fused.lamb_fused``)."""
    if ok is not None and not bool(ok):  # on CPU a bool costs nothing; a skipped step touches nothing
        return
    n = len(params)
    dtype = params[0].dtype
    numel = _numels(params)
    ones = torch.ones(n, dtype=torch.float64)
    c1, c2 = (_f64(bc1), _f64(bc2)) if bias_correction else (ones, ones)
    hp = _hp(beta1, beta2, eps, weight_decay, 1.0 if clip is None else float(clip))
    tables = (ctypes.c_int64(n), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs), _addr(numel),
              _addr(c1), _addr(c2), _addr(hp), ctypes.c_int(int(adapt)))
    if reduce is None and _one_call(numel):  # pass 2 of each batch right after its pass 1
        lr_phi, scale = _lr_phi(lr, phi_bounds), torch.empty(n, dtype=torch.float64)
        _call("lb_lamb_step", dtype, *tables, _addr(lr_phi), _addr(scale), ctypes.c_int64(_KEEP))
        return
    sq = torch.zeros(2, n, dtype=torch.float64)
    _call("lb_lamb_pass1", dtype, *tables, _addr(sq))
    if adapt and reduce is not None:
        reduce(sq)
    scale = (-_lr(lr) * _ratio(sq, 1, adapt, phi_bounds)).contiguous()
    _call("lb_lamb_pass2", dtype, ctypes.c_int64(n), _ptrs(params), _ptrs(exp_avgs), _ptrs(exp_avg_sqs),
          _addr(numel), _addr(c1), _addr(c2), _addr(hp), _addr(scale))


def lans(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
         g_norm: Tensor, bc1: Tensor, bc2: Tensor, ok: Tensor | None, lr: float | Tensor, beta1: float,
         beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
         phi_bounds: tuple[float, float] | None, reduce: Callable | None) -> None:
    """One LANS update (the interface of ``_fused.lans_fused``)."""
    if ok is not None and not bool(ok):
        return
    n = len(params)
    dtype = params[0].dtype
    numel = _numels(params)
    ones = torch.ones(n, dtype=torch.float64)
    c1, c2 = (_f64(bc1), _f64(bc2)) if bias_correction else (ones, ones)
    gn = _f64(g_norm)
    hp = _hp(beta1, beta2, eps, weight_decay)
    tables = (ctypes.c_int64(n), _ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs), _addr(numel),
              _addr(c1), _addr(c2), _addr(gn), _addr(hp))
    if reduce is None and _one_call(numel):
        lr_phi, scales = _lr_phi(lr, phi_bounds), torch.empty(2, n, dtype=torch.float64)
        _call("lb_lans_step", dtype, *tables, ctypes.c_int(int(adapt)), _addr(lr_phi), _addr(scales),
              ctypes.c_int64(_KEEP))
        return
    sq = torch.zeros(3, n, dtype=torch.float64)
    _call("lb_lans_pass1", dtype, *tables, ctypes.c_int(int(adapt)), _addr(sq))
    if adapt and reduce is not None:
        reduce(sq)
    lr64 = _lr(lr)
    scale_r = (-beta1 * lr64 * _ratio(sq, 1, adapt, phi_bounds)).contiguous()
    scale_c = (-(1 - beta1) * lr64 * _ratio(sq, 2, adapt, phi_bounds)).contiguous()
    _call("lb_lans_pass2", dtype, *tables, _addr(scale_r), _addr(scale_c))
