"""The Triton kernels of the fused LAMB/LANS path (device code; ``_fused`` builds their tables and
launches them). See ``_fused``'s docstring for the passes and what each reads and writes."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

if triton is not None:

    # (Helpers are few and branch on constexprs inside: under the interpreter every nested call of a
    # jit function costs a patch of the language module.)

    @triton.jit
    def _div(a, b, F64: tl.constexpr):
        if F64:
            q = a / b
        else:
            q = tl.div_rn(a, b)
        return q

    @triton.jit
    def _store(ptr, offs, x, mask, P_DT: tl.constexpr, MANUAL_BF16: tl.constexpr):
        """Store fp32 ``x`` as ``P_DT``. The interpreter truncates fp32 -> bf16; the GPU and torch round
        to nearest even, which ``MANUAL_BF16`` does with integer ops (identical results)."""
        if MANUAL_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr + offs, x.to(P_DT), mask=mask)

    @triton.jit
    def _chunk(numels, chunk_tensor, chunk_start, ok_ptr, HAS_OK: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        offs = tl.load(chunk_start + pid) + tl.arange(0, BLOCK)
        n = tl.load(numels + t)
        if HAS_OK:  # a skipped step (ok == 0) reads and writes nothing
            n = n * tl.load(ok_ptr)
        return t, offs, offs < n

    @triton.jit
    def _sumsq_kernel(g_ptrs, numels, chunk_tensor, chunk_start, out,
                      BLOCK: tl.constexpr, G_DT: tl.constexpr, C_DT: tl.constexpr):
        t, offs, mask = _chunk(numels, chunk_tensor, chunk_start, numels, False, BLOCK)
        g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
        tl.atomic_add(out + t, tl.sum(g * g, axis=0).to(tl.float64))

    @triton.jit
    def _lamb_update(p, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION: tl.constexpr, F64: tl.constexpr):
        if F64:
            if BIAS_CORRECTION:
                m = m / bc1
                v = v / bc2
            u = m / (tl.sqrt(v) + eps) + wd * p
        else:
            if BIAS_CORRECTION:
                m = tl.div_rn(m, bc1)
                v = tl.div_rn(v, bc2)
            u = tl.div_rn(m, tl.sqrt_rn(v) + eps) + wd * p
        return u

    @triton.jit
    def _lamb_pass1(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, chunk_tensor, chunk_start,
                    hp, bc1_ptr, bc2_ptr, ok_ptr, clip_ptr, x_sq, u_sq,
                    HAS_OK: tl.constexpr, HAS_CLIP: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
                    ADAPT: tl.constexpr, BLOCK: tl.constexpr,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, C_DT: tl.constexpr, F64: tl.constexpr,
                    MANUAL_BF16: tl.constexpr):
        t, offs, mask = _chunk(numels, chunk_tensor, chunk_start, ok_ptr, HAS_OK, BLOCK)
        p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
        g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(C_DT))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(C_DT))
        b1 = tl.load(hp + 0).to(C_DT)
        omb1 = tl.load(hp + 1).to(C_DT)
        b2 = tl.load(hp + 2).to(C_DT)
        omb2 = tl.load(hp + 3).to(C_DT)
        eps = tl.load(hp + 4).to(C_DT)
        wd = tl.load(hp + 5).to(C_DT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
        if HAS_CLIP:
            g = _div(g, tl.load(clip_ptr).to(C_DT), F64)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m * b1 + g * omb1
        v = v * b2 + g * g * omb2
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if ADAPT:
            u = _lamb_update(p, m, v, tl.load(bc1_ptr + t).to(C_DT), tl.load(bc2_ptr + t).to(C_DT), eps, wd,
                             BIAS_CORRECTION, F64)
            u = tl.where(mask, u, 0.0)
            tl.atomic_add(u_sq + t, tl.sum(u * u, axis=0).to(tl.float64))
            tl.atomic_add(x_sq + t, tl.sum(p * p, axis=0).to(tl.float64))

    @triton.jit
    def _ratio(x_sq, u_sq, t, hp, ADAPT: tl.constexpr, PHI: tl.constexpr):
        """The trust ratio in float64, as ``_core.trust_ratios`` computes it: ``phi(||x||)/||u||``,
        1 where either norm is 0."""
        if ADAPT:
            xn = tl.sqrt(tl.load(x_sq + t))
            un = tl.sqrt(tl.load(u_sq + t))
            phi = xn
            if PHI:
                phi = tl.minimum(tl.maximum(xn, tl.load(hp + 6)), tl.load(hp + 7))
            ratio = tl.where((xn > 0) & (un > 0), phi / tl.where(un > 0, un, 1.0), 1.0)
        else:
            ratio = tl.load(hp + 8)  # 1.0
        return ratio

    @triton.jit
    def _lamb_pass2(p_ptrs, m_ptrs, v_ptrs, numels, chunk_tensor, chunk_start,
                    hp, bc1_ptr, bc2_ptr, ok_ptr, lr_ptr, x_sq, u_sq,
                    HAS_OK: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr,
                    PHI: tl.constexpr, BLOCK: tl.constexpr,
                    P_DT: tl.constexpr, C_DT: tl.constexpr, F64: tl.constexpr, MANUAL_BF16: tl.constexpr):
        t, offs, mask = _chunk(numels, chunk_tensor, chunk_start, ok_ptr, HAS_OK, BLOCK)
        p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(C_DT))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(C_DT))
        eps = tl.load(hp + 4).to(C_DT)
        wd = tl.load(hp + 5).to(C_DT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        u = _lamb_update(p, m, v, tl.load(bc1_ptr + t).to(C_DT), tl.load(bc2_ptr + t).to(C_DT), eps, wd,
                         BIAS_CORRECTION, F64)
        # the step size -lr * ratio, in float64 then rounded once, as the foreach path does
        scale = -tl.load(lr_ptr) * _ratio(x_sq, u_sq, t, hp, ADAPT, PHI)
        p = p + u * scale.to(C_DT)
        _store(p_ptr, offs, p, mask, P_DT, MANUAL_BF16)

    @triton.jit
    def _lans_directions(p, gh, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION: tl.constexpr, F64: tl.constexpr):
        if F64:
            if BIAS_CORRECTION:
                m = m / bc1
                v = v / bc2
            denom = tl.sqrt(v) + eps
            r = m / denom + wd * p
            c = gh / denom + wd * p
        else:
            if BIAS_CORRECTION:
                m = tl.div_rn(m, bc1)
                v = tl.div_rn(v, bc2)
            denom = tl.sqrt_rn(v) + eps
            r = tl.div_rn(m, denom) + wd * p
            c = tl.div_rn(gh, denom) + wd * p
        return r, c

    @triton.jit
    def _lans_pass1(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, chunk_tensor, chunk_start,
                    hp, bc1_ptr, bc2_ptr, ok_ptr, gnorm_ptr, x_sq, r_sq, c_sq,
                    HAS_OK: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr,
                    BLOCK: tl.constexpr, P_DT: tl.constexpr, G_DT: tl.constexpr, C_DT: tl.constexpr,
                    F64: tl.constexpr, MANUAL_BF16: tl.constexpr):
        t, offs, mask = _chunk(numels, chunk_tensor, chunk_start, ok_ptr, HAS_OK, BLOCK)
        p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
        g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(C_DT))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(C_DT))
        b1 = tl.load(hp + 0).to(C_DT)
        omb1 = tl.load(hp + 1).to(C_DT)
        b2 = tl.load(hp + 2).to(C_DT)
        omb2 = tl.load(hp + 3).to(C_DT)
        eps = tl.load(hp + 4).to(C_DT)
        wd = tl.load(hp + 5).to(C_DT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
        gn = tl.load(gnorm_ptr + t).to(C_DT)
        gh = _div(g, gn, F64)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m * b1 + gh * omb1
        v = v * b2 + gh * gh * omb2
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if ADAPT:
            r, c = _lans_directions(p, gh, m, v, tl.load(bc1_ptr + t).to(C_DT), tl.load(bc2_ptr + t).to(C_DT),
                                    eps, wd, BIAS_CORRECTION, F64)
            r = tl.where(mask, r, 0.0)
            c = tl.where(mask, c, 0.0)
            tl.atomic_add(x_sq + t, tl.sum(p * p, axis=0).to(tl.float64))
            tl.atomic_add(r_sq + t, tl.sum(r * r, axis=0).to(tl.float64))
            tl.atomic_add(c_sq + t, tl.sum(c * c, axis=0).to(tl.float64))

    @triton.jit
    def _lans_pass2(p_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, chunk_tensor, chunk_start,
                    hp, bc1_ptr, bc2_ptr, ok_ptr, gnorm_ptr, lr_ptr, x_sq, r_sq, c_sq,
                    HAS_OK: tl.constexpr, BIAS_CORRECTION: tl.constexpr, ADAPT: tl.constexpr,
                    PHI: tl.constexpr, BLOCK: tl.constexpr,
                    P_DT: tl.constexpr, G_DT: tl.constexpr, C_DT: tl.constexpr, F64: tl.constexpr,
                    MANUAL_BF16: tl.constexpr):
        t, offs, mask = _chunk(numels, chunk_tensor, chunk_start, ok_ptr, HAS_OK, BLOCK)
        p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DT))
        g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
        m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(C_DT))
        v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(C_DT))
        eps = tl.load(hp + 4).to(C_DT)
        wd = tl.load(hp + 5).to(C_DT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        gh = _div(g, tl.load(gnorm_ptr + t).to(C_DT), F64)
        r, c = _lans_directions(p, gh, m, v, tl.load(bc1_ptr + t).to(C_DT), tl.load(bc2_ptr + t).to(C_DT), eps,
                                wd, BIAS_CORRECTION, F64)
        lr = tl.load(lr_ptr)
        scale_r = -tl.load(hp + 0) * lr * _ratio(x_sq, r_sq, t, hp, ADAPT, PHI)
        scale_c = -tl.load(hp + 1) * lr * _ratio(x_sq, c_sq, t, hp, ADAPT, PHI)
        p = p + r * scale_r.to(C_DT) + c * scale_c.to(C_DT)
        _store(p_ptr, offs, p, mask, P_DT, MANUAL_BF16)
