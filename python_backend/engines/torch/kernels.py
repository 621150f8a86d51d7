"""The torch engine's Triton kernels, and the launch configuration of the decode attention.

`load_kernels()` defines them the first time it is called, where Triton imports (on CPU they run
under TRITON_INTERPRET=1), and returns them in a namespace:
  * add_rmsnorm: residual add (in place) + RMSNorm, rounded like HF's (`FP8`: the output rounded
    to E4M3 per row, a W8A8 product's input, as fp8_rows does);
  * rope_kv: RoPE of a prompt's q and k rows + the K/V cache write;
  * silu_mul: SiLU(gate) * up (`FP8` as add_rmsnorm's);
  * attn_split (+ attn_combine when a sequence is split): split-K decode attention reading the cache
    in place through the slot indices and lengths (flash-decoding style), RoPE and the cache write
    of the step's new key and value included;
  * prefill_attn: varlen causal attention of packed prompts, one program per block of queries;
  * w8_matmul: X @ W^T with 8-bit weights (int8 or FP8 E4M3) and a scale per output channel, the
    weights widened in registers (a decode step reads half the bytes); one row on the CUDA cores,
    more through `tl.dot` (either operand order), or (W8A8) FP8 rows by FP8 weights on the FP8
    tensor cores; split-K fixed up by the K slices' last program in the same launch;
  * w8_matmul_tma: w8_matmul's `tl.dot(X, W^T)` form with the tiles streamed by Hopper's TMA (tensor
    descriptors);
  * w8_widen: an 8-bit weight times its scales, in the engine's dtype (the dense product's input
    where a product has too many rows for w8_matmul);
  * fp8_rows: each row of an activation rounded to FP8 E4M3 with a scale of its own (the input of
    the W8A8 products, matmul.py).
The decode step's kernels (add_rmsnorm, silu_mul, attn_split, attn_combine, w8_matmul, fp8_rows) take `PDL`:
launched with programmatic dependent launch (Hopper on, `launch_pdl=True`), a kernel's programs start
while the kernel before it still runs, read what does not depend on it (add_rmsnorm: the norm's
weights), then wait for it (`gdc_wait`: every kernel before it in the stream has finished and its
writes are seen) and let the next kernel start (`gdc_launch_dependents`). Every load of another
kernel's output comes after the wait, so the order is the stream's.
Their callers are in `llama.py` and `matmul.py`; `benchmarks/common.py` launches the decode attention directly
(for `gpu_attn.py` and `gpu_l2.py`).
"""

from __future__ import annotations

import types

# decode attention splits no sequence while the cache holds at most this many positions: a split
# costs a combine kernel and idle programs (figures: docs/benchmarks-gpu.md, "Figures behind
# settings in the code")
SPLIT_MIN_POSITIONS = 512


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pdl_supported(tk, device) -> bool:
    """Can the kernels `tk` be launched with programmatic dependent launch on `device`? (Hopper or
    later, and a Triton with grid dependency control.)"""
    if tk is None or not getattr(tk, "gdc", False) or device.type != "cuda":
        return False
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 9


def decode_attention_config(b: int, kv_heads: int, head_dim: int, max_seq_len: int, sms: int,
                            split_min: int = SPLIT_MIN_POSITIONS) -> tuple[int, int]:
    """(splits, BLOCK_N) of the decode attention for `b` rows. Splits of each sequence's positions:
    1 (no combine kernel) once the batch's (row, kv head) programs fill every SM or the cache is
    short (at most `split_min` positions), else enough for about two programs per SM. A few rows in
    one split read keys in longer blocks, which is faster (figures: docs/benchmarks-gpu.md, "Figures
    behind settings in the code")."""
    full = b * kv_heads >= sms
    if full or max_seq_len <= split_min:
        ns = 1
    else:
        want = next_pow2(max(1, cdiv(2 * sms, b * kv_heads)))
        ns = max(2, min(want, next_pow2(max(1, cdiv(max_seq_len, 64)))))
    block_n = 128 if ns == 1 and head_dim <= 64 and not full else (64 if head_dim <= 128 else 32)
    return ns, block_n


_KERNELS = None


def load_kernels():
    """Return a namespace of the Triton kernels, or None where Triton is unusable."""
    # a @triton.jit helper is found through the module's globals
    global _KERNELS, _attend_block, _fp8_row, _widen_bits, _finish_tile, _store_scaled
    if _KERNELS is not None:
        return _KERNELS or None
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - no Triton: the torch ops take over
        _KERNELS = False
        return None
    global _gdc_wait, _gdc_launch  # grid dependency control; None: this Triton has none (PDL off)
    try:
        from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch
        from triton.language.extra.cuda import gdc_wait as _gdc_wait
    except Exception:  # noqa: BLE001
        _gdc_wait = _gdc_launch = None

    @triton.jit
    def _fp8_row(y):
        # a row (float32, its padding zeros) rounded to E4M3 with its own scale max|y| / 448:
        # quant.quantize_rows_fp8's numbers (IEEE divisions, as torch's; Triton's plain `/` is an
        # approximate one on the GPU); returns (the values, still float32, the scale)
        sc = tl.maximum(tl.div_rn(tl.max(tl.abs(y), axis=0), 448.0), 1e-12)
        return tl.minimum(tl.maximum(tl.div_rn(y, sc), -448.0), 448.0), sc

    @triton.jit
    def add_rmsnorm_kernel(X, R, W, Y, QS, stride_x, stride_r, stride_y, N, eps,
                           HAS_RES: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr = False,
                           PDL: tl.constexpr = False):
        # R <- R + X (the residual stream, in place); Y <- rmsnorm(R) * W, rounded like HF's; with
        # FP8, Y gets that row rounded to E4M3 and QS its scale (fp8_rows' numbers: a W8A8 product's input)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        w = tl.load(W + cols, mask=m, other=0.0)  # the norm's weights: before the wait (PDL)
        if PDL:
            _gdc_wait()
            _gdc_launch()
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(R + row * stride_r + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(X.dtype.element_ty)
        if FP8:
            y, sc = _fp8_row((w.to(tl.float32) * y.to(tl.float32)).to(X.dtype.element_ty).to(tl.float32))
            tl.store(QS + row, sc)
        else:
            y = w.to(tl.float32) * y.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def rope_kv_kernel(QKV, Cos, Sin, Slots, Pos, Q, KC, VC,
                       stride_qkv, stride_cos, stride_cs, stride_ch, stride_ct,
                       HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        # one program per (row, head): rotate q heads into Q [rows, HQ, D]; rotate k heads and copy
        # v heads into the cache at [slot, head, pos]
        row = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(Pos + row)
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, DP)
        m = d < D
        rd = tl.where(d < HALF, d + HALF, d - HALF)
        c = tl.load(Cos + pos * stride_cos + d, mask=m, other=0.0).to(tl.float32)
        s = tl.load(Sin + pos * stride_cos + d, mask=m, other=0.0).to(tl.float32)
        base = QKV + row * stride_qkv + h * D
        x = tl.load(base + d, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(base + rd, mask=m, other=0.0).to(tl.float32)
        xr = tl.where(d < HALF, -xr, xr)
        dt = Q.dtype.element_ty
        y = ((x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)).to(dt)
        if h < HQ:
            tl.store(Q + (row * HQ + h) * D + d, y, mask=m)
        else:
            kvh = h - HQ
            slot = tl.load(Slots + row)
            off = slot * stride_cs + kvh * stride_ch + pos * stride_ct + d
            tl.store(KC + off, y, mask=m)
            v = tl.load(QKV + row * stride_qkv + (HQ + HKV + kvh) * D + d, mask=m, other=0.0)
            tl.store(VC + off, v, mask=m)

    @triton.jit
    def silu_mul_kernel(GU, O, QS, stride_gu, stride_o, I, BLOCK: tl.constexpr, FP8: tl.constexpr = False,
                        PDL: tl.constexpr = False):
        # O <- SiLU(gate) * up; with FP8 (one program a row, BLOCK >= I) O gets the row rounded to
        # E4M3 and QS its scale, as add_rmsnorm's FP8
        if PDL:
            _gdc_wait()
            _gdc_launch()
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < I
        g = tl.load(GU + row * stride_gu + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + I + c, mask=m, other=0.0).to(tl.float32)
        dt = O.dtype.element_ty
        a = (g / (1.0 + tl.exp(-g))).to(GU.dtype.element_ty).to(tl.float32)
        y = a * u
        if FP8:
            y, sc = _fp8_row(y.to(GU.dtype.element_ty).to(tl.float32))
            tl.store(QS + row, sc)
        tl.store(O + row * stride_o + c, y.to(dt), mask=m)

    @triton.jit
    def _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, ok, m_i, l_i, acc, IEEE: tl.constexpr):
        # one block of keys/values at positions t (tm: in range) for the queries q, where `ok`
        # (broadcast to [queries, keys]) allows: online softmax in base 2; returns (max, sum, acc)
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(kb + t[:, None] * stride_ct + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + t[:, None] * stride_ct + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def attn_split_kernel(Q, KC, VC, Slots, Lens, Acc, Mx, Lx, O, Cos, Sin,
                          stride_q, stride_cos, stride_cs, stride_ch, stride_ct, qk_scale,
                          HQ: tl.constexpr, HKV: tl.constexpr, NS: tl.constexpr, CHUNK: tl.constexpr,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          BLOCK_N: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr,
                          PDL: tl.constexpr = False):
        # program (b, kv head, split): the G query heads of one kv head against positions
        # [split * CHUNK, min((split + 1) * CHUNK, len + 1)) of slot Slots[b]; online softmax in
        # base 2, unnormalised partial output and its (max, sum) go to Acc / Mx / Lx; with one
        # split (NS == 1) the normalised output goes straight to O [b, HQ * D], no combine.
        # ROPE: Q holds the step's q/k/v rows (row stride stride_q), not yet rotated: the program
        # rotates its q heads at position len, and the one whose split holds that position also
        # rotates the new key and writes it and the new value into the cache before reading it
        # (what rope_kv_kernel did, one launch per layer less); else Q is [b, HQ, D], rotated.
        if PDL:  # the slots and lengths too may come from a kernel before (a chained step's)
            _gdc_wait()
            _gdc_launch()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        slot = tl.load(Slots + b)
        pos = tl.load(Lens + b).to(tl.int32)
        n = pos + 1
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        qm = gm[:, None] & dm[None, :]
        if ROPE:
            HALF: tl.constexpr = D // 2
            rd = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
            c = tl.load(Cos + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            sn = tl.load(Sin + pos * stride_cos + d, mask=dm, other=0.0).to(tl.float32)
            row = Q + b * stride_q
            dt = KC.dtype.element_ty
            x = tl.load(row + heads[:, None] * D + d[None, :], mask=qm, other=0.0).to(tl.float32)
            xr = tl.load(row + heads[:, None] * D + rd[None, :], mask=qm, other=0.0).to(tl.float32) * sign[None, :]
            q = ((x * c[None, :]).to(dt).to(tl.float32) + (xr * sn[None, :]).to(dt).to(tl.float32)).to(dt)
            if (start <= pos) & (pos < end):
                kx = tl.load(row + (HQ + kvh) * D + d, mask=dm, other=0.0).to(tl.float32)
                kr = tl.load(row + (HQ + kvh) * D + rd, mask=dm, other=0.0).to(tl.float32) * sign
                k = ((kx * c).to(dt).to(tl.float32) + (kr * sn).to(dt).to(tl.float32)).to(dt)
                v = tl.load(row + (HQ + HKV + kvh) * D + d, mask=dm, other=0.0)
                off = slot * stride_cs + kvh * stride_ch + pos * stride_ct + d
                tl.store(KC + off, k, mask=dm)
                tl.store(VC + off, v, mask=dm)
            tl.debug_barrier()  # the block's stores are seen by its loads below
        else:
            q = tl.load(Q + (b * HQ + heads)[:, None] * D + d[None, :], mask=qm, other=0.0)
        kb = KC + slot * stride_cs + kvh * stride_ch
        vb = VC + slot * stride_cs + kvh * stride_ch
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for s0 in range(start, end, BLOCK_N):
            t = s0 + tl.arange(0, BLOCK_N)
            tm = t < end
            m_i, l_i, acc = _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, tm[None, :],
                                          m_i, l_i, acc, IEEE)
        if NS == 1:
            out = acc / l_i[:, None]  # l_i >= 1: every row sees position 0
            tl.store(O + (b * HQ + heads)[:, None] * D + d[None, :], out.to(O.dtype.element_ty),
                     mask=gm[:, None] & dm[None, :])
        else:
            o = (b * HQ + heads) * NS + sp
            tl.store(Acc + o[:, None] * DP + d[None, :], acc, mask=gm[:, None])
            tl.store(Mx + o, m_i, mask=gm)
            tl.store(Lx + o, l_i, mask=gm)

    @triton.jit
    def attn_combine_kernel(Acc, Mx, Lx, O, HQ: tl.constexpr, NS: tl.constexpr,
                            D: tl.constexpr, DP: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            _gdc_wait()
            _gdc_launch()
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, NS)
        d = tl.arange(0, DP)
        base = (b * HQ + h) * NS
        m = tl.load(Mx + base + s)
        l = tl.load(Lx + base + s)
        mx = tl.max(m, 0)  # split 0 always holds position 0: finite
        w = tl.exp2(m - mx)  # empty splits: exp2(-inf) = 0
        acc = tl.load(Acc + (base + s)[:, None] * DP + d[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
        tl.store(O + (b * HQ + h) * D + d, out.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def prefill_attn_kernel(Q, KC, VC, Table, O, stride_q, stride_cs, stride_ch, stride_ct, qk_scale,
                            HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        # program (query block, q head) of packed prompts (varlen, causal). Table row of the block:
        # packed row of its first query, the prompt's slot, that query's position, queries in the
        # block (0: a padding program, which does nothing). Keys: the prompt's own positions
        # 0 .. last query, read from the cache (written by rope_kv just before).
        blk = tl.program_id(0)
        h = tl.program_id(1)
        row0 = tl.load(Table + blk * 4)
        slot = tl.load(Table + blk * 4 + 1)
        p0 = tl.load(Table + blk * 4 + 2).to(tl.int32)
        nq = tl.load(Table + blk * 4 + 3).to(tl.int32)
        if nq > 0:
            m = tl.arange(0, BLOCK_M)
            d = tl.arange(0, DP)
            qm = m < nq
            dm = d < D
            rows = row0 + m
            q = tl.load(Q + rows[:, None] * stride_q + h * D + d[None, :], mask=qm[:, None] & dm[None, :], other=0.0)
            kvh = h // G
            kb = KC + slot * stride_cs + kvh * stride_ch
            vb = VC + slot * stride_cs + kvh * stride_ch
            qpos = p0 + m
            end = p0 + nq
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DP], tl.float32)
            for s0 in range(0, end, BLOCK_N):
                t = s0 + tl.arange(0, BLOCK_N)
                tm = t < end
                ok = tm[None, :] & (t[None, :] <= qpos[:, None])  # causal
                m_i, l_i, acc = _attend_block(q, kb, vb, t, tm, d, dm, stride_ct, qk_scale, ok,
                                              m_i, l_i, acc, IEEE)
            out = acc / l_i[:, None]  # padding rows (m >= nq) see key 0: finite, not stored
            tl.store(O + rows[:, None] * (HQ * D) + h * D + d[None, :], out.to(O.dtype.element_ty),
                     mask=qm[:, None] & dm[None, :])

    @triton.jit
    def _widen_bits(w):
        # 8-bit weights to float32 by integer ops, exactly (type conversions issue 16 a clock an SM
        # on Hopper, logic ops and shifts 64: the CUDA guide's throughput table). int8 v -> the float
        # 2^23 + 128 + v, less 2^23 + 128; E4M3 s.eeee.mmm -> the float32 bits s.0000eeee.mmm0..,
        # times 2^(127 - 7) for the bias (exact for the subnormals too: there the float32 is
        # subnormal, the product normal). Measured: faster for INT8, slower for FP8 (matmul.py)
        u = w.to(tl.uint8, bitcast=True).to(tl.uint32)
        if w.dtype == tl.int8:
            return ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return (((u & 0x7F) << 20) | ((u & 0x80) << 24)).to(tl.float32, bitcast=True) * 1.329227995784916e36

    @triton.jit
    def w8_matmul_kernel(X, W, S, SX, Y, P, C, M, N, K, KS, SPLIT, stride_xm, stride_wn, stride_ym, stride_p,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FIXUP: tl.constexpr,
                         FORM: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
                         SCALED: tl.constexpr = True):
        # Y[m-block, n-block] = (X[m-block] @ W[n-block]^T) * S[n-block]: W is int8 or FP8 with one
        # scale per output channel, widened tile by tile in registers; or (SCALED False, S unread) W
        # in X's dtype, where the one-row forms beat cuBLAS (quant.DenseWeight). K and KS are not
        # compile-time constants: one compile serves every shape. FORM:
        #   0  one row (BM=1): products and row sums on the CUDA cores, no tile of padding rows;
        #   1  tl.dot(X, W^T): X's rows (at least 16) are the MMA's M;
        #   2  tl.dot(W, X^T), transposed at the end: the weight tile (64 or 128 rows) is the MMA's M,
        #      the operand Hopper's wgmma may take from registers, where the widened weight is.
        #   3  one row, as 0, but each thread keeps its products' sums over the whole K slice and the
        #      row sums (shuffles across the warp) happen once, after the loop;
        #   4  as 3, the weights widened by integer ops (`_widen_bits`) instead of conversions;
        #   5  W8A8: X's rows already rounded to FP8 with a scale each (SX), tl.dot(X, W^T) on the FP8
        #      tensor cores as they are (nothing widened), both scales applied at the end.
        # FIXUP: split-K, fixed up by the K slices' last program (`_finish_tile`).
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        pm = tl.program_id(2)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm < M
        nm = rn < N
        acc = tl.zeros([BM, BN], tl.float32)
        acc_t = tl.zeros([BN, BM], tl.float32)
        acc_k = tl.zeros([BN, BK], tl.float32)  # FORM 3, 4 (unused by the others: no registers)
        if PDL:
            _gdc_wait()
            _gdc_launch()
        for k0 in range(pk * KS, pk * KS + KS, BK):
            ks = k0 + rk
            km = ks < K
            x = tl.load(X + rm[:, None] * stride_xm + ks[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(W + rn[:, None] * stride_wn + ks[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            if FORM == 0:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            elif FORM == 3:
                acc_k += w.to(tl.float32) * x.to(tl.float32)
            elif FORM == 4:
                acc_k += _widen_bits(w) * x.to(tl.float32)
            elif FORM == 5:  # the products' sums promoted to float32 every 64 of K, not only at the end
                acc = tl.dot(x, tl.trans(w), acc, max_num_imprecise_acc=64)
            elif FORM == 1:
                if IEEE:
                    acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
            else:
                if IEEE:
                    acc_t = tl.dot(w.to(x.dtype), tl.trans(x), acc_t, input_precision="ieee")
                else:
                    acc_t = tl.dot(w.to(x.dtype), tl.trans(x), acc_t)
        if FORM == 2:
            acc = tl.trans(acc_t)
        if FORM == 3 or FORM == 4:
            acc = tl.sum(acc_k, axis=1)[None, :]
        _finish_tile(acc, S, SX, Y, P, C, rm, rn, mm, nm, pk, pm, N, SPLIT, stride_ym, stride_p, FIXUP, SCALED,
                     FORM == 5)

    @triton.jit
    def w8_matmul_tma_kernel(XD, WD, S, Y, P, C, M, N, K, KS, SPLIT, stride_ym, stride_p,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FIXUP: tl.constexpr,
                             IEEE: tl.constexpr, PDL: tl.constexpr = False, SCALED: tl.constexpr = True,
                             WS: tl.constexpr = False):
        # w8_matmul's FORM 1 (tl.dot(X, W^T), at least 16 rows) over tensor descriptors: Hopper's copy
        # engine (TMA) streams the rows' and the weights' tiles into shared memory, where tl.dot reads
        # them; past K and past M the descriptors read zeros. 8-bit weights are widened after the load.
        # WS: the loop warp-specialised (Triton's Hopper pass; tuned in the 64-row bucket): a producer warpgroup
        # issues the copies, the consumer the MMAs, so a wait on one MMA does not stall the next copy.
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        pm = tl.program_id(2)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        if PDL:
            _gdc_wait()
            _gdc_launch()
        for k0 in tl.range(pk * KS, pk * KS + KS, BK, warp_specialize=WS):
            x = XD.load([pm * BM, k0])
            w = WD.load([pn * BN, k0])
            if IEEE:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        _finish_tile(acc, S, S, Y, P, C, rm, rn, rm < M, rn < N, pk, pm, N, SPLIT, stride_ym, stride_p, FIXUP,
                     SCALED, False)

    @triton.jit
    def _finish_tile(acc, S, SX, Y, P, C, rm, rn, mm, nm, pk, pm, N, SPLIT, stride_ym, stride_p,
                     FIXUP: tl.constexpr, SCALED: tl.constexpr, ROW_SCALED: tl.constexpr):
        # a product tile's end: the output channels' scales (SCALED) and the rows' (ROW_SCALED, W8A8),
        # into Y. FIXUP: program (n, k, m) holds K-slice k's sums only and stores them in the fp32
        # workspace P; the last of a tile's SPLIT programs to finish (counter C) adds the slices in a
        # fixed order (the same sums every run), writes Y and puts the counter back to 0: one launch
        # where split-K with atomics took three (zero Y, add, cast).
        om = mm[:, None] & nm[None, :]
        if FIXUP:
            cell = rm[:, None] * N + rn[None, :]
            tl.store(P + pk * stride_p + cell, acc, mask=om)
            tl.debug_barrier()  # every thread's slice is stored before the counter says so
            tile = pm * tl.num_programs(0) + tl.program_id(0)
            if tl.atomic_add(C + tile, 1, sem="acq_rel") == SPLIT - 1:
                tl.debug_barrier()
                total = tl.zeros(acc.shape, tl.float32)
                for s in range(0, SPLIT):
                    part = tl.load(P + s * stride_p + cell, mask=om, other=0.0, cache_modifier=".cg")
                    total += tl.where(s == pk, acc, part)
                _store_scaled(total, S, SX, Y, rm, rn, mm, nm, stride_ym, SCALED, ROW_SCALED)
                tl.atomic_xchg(C + tile, 0)
        else:
            _store_scaled(acc, S, SX, Y, rm, rn, mm, nm, stride_ym, SCALED, ROW_SCALED)

    @triton.jit
    def _store_scaled(v, S, SX, Y, rm, rn, mm, nm, stride_ym, SCALED: tl.constexpr, ROW_SCALED: tl.constexpr):
        # a tile's sums times the output channels' scales (SCALED) and the rows' (ROW_SCALED), into Y
        if SCALED:
            v = v * tl.load(S + rn, mask=nm, other=0.0)[None, :]
        if ROW_SCALED:
            v = v * tl.load(SX + rm, mask=mm, other=0.0)[:, None]
        tl.store(Y + rm[:, None] * stride_ym + rn[None, :], v.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def w8_widen_kernel(W, S, Y, N, K, BN: tl.constexpr, BK: tl.constexpr):
        # Y = W * S[:, None] in Y's type, computed in fp32 (quant.dequantize's numbers) in one pass:
        # 1 byte read and 2 written per weight, where the torch ops made float32 copies on the way
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        nm = rn < N
        m = nm[:, None] & (rk < K)[None, :]
        off = rn[:, None] * K + rk[None, :]
        w = tl.load(W + off, mask=m, other=0.0).to(tl.float32)
        s = tl.load(S + rn, mask=nm, other=0.0)
        tl.store(Y + off, (w * s[:, None]).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def fp8_rows_kernel(X, Q, S, stride_x, stride_q, K, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        # Q[row] = X[row] / S[row] in E4M3, S[row] = max|X[row]| / 448 (`_fp8_row`)
        row = tl.program_id(0)
        if PDL:
            _gdc_wait()
            _gdc_launch()
        cols = tl.arange(0, BLOCK)
        m = cols < K
        q, s = _fp8_row(tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32))
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=m)
        tl.store(S + row, s)

    _KERNELS = types.SimpleNamespace(
        gdc=_gdc_wait is not None,
        add_rmsnorm=add_rmsnorm_kernel,
        rope_kv=rope_kv_kernel,
        silu_mul=silu_mul_kernel,
        attn_split=attn_split_kernel,
        attn_combine=attn_combine_kernel,
        prefill_attn=prefill_attn_kernel,
        w8_matmul=w8_matmul_kernel,
        w8_matmul_tma=w8_matmul_tma_kernel,
        w8_widen=w8_widen_kernel,
        fp8_rows=fp8_rows_kernel,
    )
    return _KERNELS
