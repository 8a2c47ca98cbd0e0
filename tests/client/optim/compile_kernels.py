"""Compiles the fused path's Triton kernels for an H100 (sm_90) without a GPU: Triton's front end,
its MLIR passes, PTX and ptxas run on any machine. Run in a process without TRITON_INTERPRET (under
the interpreter the kernels are never compiled). Prints one line per kernel variant."""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import largebatch.client.optim._fused as fused

POINTERS = {
    "p_ptrs": "*i64", "g_ptrs": "*i64", "m_ptrs": "*i64", "v_ptrs": "*i64", "numels": "*i64",
    "chunk_tensor": "*i32", "chunk_start": "*i64", "hp": "*fp64", "bc1_ptr": "*fp64", "bc2_ptr": "*fp64",
    "ok_ptr": "*i64", "clip_ptr": "*fp64", "x_sq": "*fp64", "u_sq": "*fp64", "r_sq": "*fp64", "c_sq": "*fp64",
    "out": "*fp64", "gnorm_ptr": "*fp32", "lr_ptr": "*fp64",
}


def compile_one(fn, constexprs: dict) -> str:
    signature = {name: "constexpr" if name in constexprs else POINTERS[name] for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": fused._WARPS})
    ptx = kernel.asm["ptx"]
    return f"{fn.__name__}: ptx {len(ptx)} chars, div.rn {'div.rn' in ptx}, sqrt.rn {'sqrt.rn' in ptx}"


def main() -> int:
    for p_dt, c_dt, f64 in ((tl.float32, tl.float32, False), (tl.bfloat16, tl.float32, False),
                            (tl.float64, tl.float64, True)):
        base = dict(BLOCK=fused._BLOCK_CUDA, P_DT=p_dt, C_DT=c_dt, F64=f64, BIAS_CORRECTION=True, HAS_OK=True,
                    ADAPT=True, MANUAL_BF16=False)
        for fn, extra in ((fused._k._sumsq_kernel, None), (fused._k._lamb_pass1, dict(HAS_CLIP=True, G_DT=p_dt)),
                          (fused._k._lamb_pass2, dict(PHI=True)), (fused._k._lans_pass1, dict(G_DT=p_dt)),
                          (fused._k._lans_pass2, dict(G_DT=p_dt, PHI=True))):
            constexprs = dict(BLOCK=fused._BLOCK_CUDA, G_DT=p_dt, C_DT=c_dt) if extra is None else {**base, **extra}
            print(p_dt, compile_one(fn, constexprs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
