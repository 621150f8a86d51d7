"""A whole one-row Llama decode step in ONE persistent Triton kernel (an experiment, issue 18).

Why: a graph-captured bf16 step at one row runs ~190 kernels, and each product costs a fixed ramp
and tail of a few µs beyond its bytes (docs/gpu-engine.md, "Next steps"; the o product takes 5.4 µs
for 8.4 MB, 2.9 µs at the copy bandwidth). Fusing neighbours gained nothing, so the remaining
question is whether one kernel that never ends (every program resident, the phases separated by a
grid-wide barrier) streams the weights closer to the copy bandwidth than ~190 separate kernels do.

The kernel: `G` programs (one per SM), every phase's work cut into equal tiles that the programs
take in turn, partial dot products added into fp32 buffers with atomics (so no program waits for
a slow row), and a grid barrier (a counter in global memory) between phases. Per layer:
  1. q|k|v product of the RMS-normed residual (each program computes the norm itself: 8 KB)
  2. attention: (kv head, block of 64 positions) items; RoPE on q and the new k; the item whose block
     holds the new position writes its k and v into the cache; partial softmax sums out
  3. o product, each tile combining its head's partial sums first, added into the residual
  4. gate|up product of the normed residual
  5. down product of SiLU(gate)·up, added into the residual
then the final norm and the LM head. 1 + 5 × layers barriers. Activations stay fp32 throughout
(the engine rounds them to bf16 between kernels), and atomics make the sums' order vary, so its
logits are compared with an fp32 reference, not bitwise.

Measured on an H200 (docs/benchmarks-gpu.md, "Thirty-second session"): 1.42× slower than the
engine's graph of ~190 kernels (1.415 against 0.994 ms): a phase still costs ~5 µs beyond its bytes
(every program's copies refill after each barrier) and the attention phase 13.7 µs a layer.

`ONLY >= 0` runs a single phase (one launch per phase, no barrier): the form the Triton interpreter
can run on a CPU (its programs run one after another, so a barrier there would never open).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sync(ctr, target, err, LIMIT: tl.constexpr):
    """Grid barrier: every program has arrived once the counter reaches `target`. The fence makes
    each thread's writes visible at GPU scope before its program counts itself in; loads after it
    read at L2 (`.cg`), which the atomics and stores reach."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [tl.full([1], 0, tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    tl.atomic_add(ctr, 1, sem="release", scope="gpu")
    n = tl.atomic_add(ctr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (n < target) & (spins < LIMIT):
        n = tl.atomic_add(ctr, 0, sem="acquire", scope="gpu")
        spins += 1
    if spins >= LIMIT:  # a program never came (not all resident): count it, do not hang
        tl.atomic_add(err, 1)
    tl.debug_barrier()


@triton.jit
def _prefetch(W, N: tl.constexpr, K: tl.constexpr, pid, G, BN: tl.constexpr, BK: tl.constexpr, PF: tl.constexpr):
    """Ask L2 for this program's first PF tiles of a coming product (its weights do not depend on
    anything computed): issued before a barrier, they arrive while the program waits there."""
    if PF > 0:
        nb: tl.constexpr = N // BN
        LINES: tl.constexpr = BK * 2 // 128  # 128-byte lines per tile row (bf16)
        rn = tl.arange(0, BN)
        rl = tl.arange(0, LINES) * 64
        for i in tl.static_range(PF):
            t = pid + i * G
            ptrs = W + ((t % nb) * BN + rn)[:, None] * K + (t // nb) * BK + rl[None, :]
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                      is_pure=False, pack=1)


@triton.jit
def _stamp(TIMES, i, pid, TIMED: tl.constexpr):
    """Program 0 writes the global timer (ns) at mark i: where a step's time goes, phase by phase."""
    if TIMED:
        if pid == 0:
            z = tl.full([1], 0, tl.int64)
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [z], dtype=tl.int64, is_pure=False,
                                          pack=1)
            tl.store(TIMES + i + tl.arange(0, 1), t)


@triton.jit
def _rstd(X, H: tl.constexpr, HP: tl.constexpr, eps):
    r = tl.arange(0, HP)
    x = tl.load(X + r, mask=r < H, other=0.0, cache_modifier=".cg")
    return 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)


@triton.jit
def _zero(P, n, pid, G, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    for i in range(pid * BLOCK, n, G * BLOCK):
        tl.store(P + i + r, tl.zeros([BLOCK], tl.float32), mask=i + r < n)


@triton.jit
def _add_tile(OUT, WS, part, n0, rn, kk, N: tl.constexpr, DET: tl.constexpr):
    """OUT[n0 + rn] += part, one k-slice's sums: an atomic add (DET off: the order of the slices'
    sums varies between runs), or into the workspace (DET on: `_settle` adds the slices in order)."""
    if DET:
        tl.store(WS + kk * N + n0 + rn, part)
    else:
        tl.atomic_add(OUT + n0 + rn, part, sem="relaxed")


@triton.jit
def _settle(OUT, WS, CNT, pid, G, T, nb: tl.constexpr, KB: tl.constexpr, N: tl.constexpr, BN: tl.constexpr,
            DET: tl.constexpr):
    """DET: after a program stored all its slices, it counts each of its tiles in; the last of an n
    block's KB slices to be counted adds them all in slice order (the same sums every run). Apart
    from the product's loop, which stays pipelined."""
    if DET:
        rn = tl.arange(0, BN)
        tl.debug_barrier()
        for t in range(pid, T, G):
            nblk = t % nb
            if tl.atomic_add(CNT + nblk, 1, sem="acq_rel", scope="gpu") == KB - 1:
                tot = tl.zeros([BN], tl.float32)
                for s in range(KB):
                    tot += tl.load(WS + s * N + nblk * BN + rn, cache_modifier=".cg")
                tl.store(OUT + nblk * BN + rn, tl.load(OUT + nblk * BN + rn, cache_modifier=".cg") + tot)
                tl.atomic_xchg(CNT + nblk, 0)


@triton.jit
def _gemv(W, N: tl.constexpr, K: tl.constexpr, X, rstd, LNW, WS, CNT, OUT, pid, G,
          MODE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, DET: tl.constexpr):
    """OUT[n] += sum_k W[n, k] · in[k] over tiles [BN, BK] (tile t: n block t % nb, k block t // nb,
    so programs running together add into different rows). in = X·rstd·LNW (MODE 0, a norm) or
    SiLU(X[k])·X[K + k] (MODE 1: gate|up sums)."""
    nb: tl.constexpr = N // BN
    T: tl.constexpr = nb * (K // BK)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    for t in tl.range(pid, T, G, num_stages=STAGES):
        n0 = (t % nb) * BN
        k0 = (t // nb) * BK
        w = tl.load(W + (n0 + rn)[:, None] * K + (k0 + rk)[None, :], eviction_policy="evict_first")
        if MODE == 0:
            xin = tl.load(X + k0 + rk, cache_modifier=".cg") * rstd * tl.load(LNW + k0 + rk).to(tl.float32)
        else:
            g = tl.load(X + k0 + rk, cache_modifier=".cg")
            u = tl.load(X + K + k0 + rk, cache_modifier=".cg")
            xin = g / (1.0 + tl.exp(-g)) * u
        part = tl.sum(w.to(tl.float32) * xin[None, :], 1)
        _add_tile(OUT, WS, part, n0, rn, t // nb, N, DET)
    _settle(OUT, WS, CNT, pid, G, T, nb, K // BK, N, BN, DET)


@triton.jit
def _attention(QKV, KC, VC, PM, PL, PA, COS, SIN, pos, layer, pid, G, scale, MAXLEN: tl.constexpr,
               HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr, S: tl.constexpr, BLK: tl.constexpr):
    """Items (kv head, block of BLK positions): partial softmax sums of the head's GRP queries over
    the block's cached positions and, in the block holding `pos`, the new key and value (rotated k
    taken from the q|k|v sums; that item also writes them into the cache)."""
    GRP: tl.constexpr = HQ // HKV
    HALF: tl.constexpr = HD // 2
    rg = tl.arange(0, GRP)
    rd = tl.arange(0, HALF)
    rp = tl.arange(0, BLK)
    c = tl.load(COS + pos * HALF + rd)
    s_ = tl.load(SIN + pos * HALF + rd)
    for item in range(pid, HKV * S, G):
        h = item // S
        s = item % S
        qb = (h * GRP + rg) * HD
        q1 = tl.load(QKV + qb[:, None] + rd[None, :], cache_modifier=".cg")
        q2 = tl.load(QKV + qb[:, None] + HALF + rd[None, :], cache_modifier=".cg")
        q1r = (q1 * c[None, :] - q2 * s_[None, :]) * scale
        q2r = (q2 * c[None, :] + q1 * s_[None, :]) * scale
        kb = HQ * HD + h * HD
        vb = HQ * HD + HKV * HD + h * HD
        k1 = tl.load(QKV + kb + rd, cache_modifier=".cg")
        k2 = tl.load(QKV + kb + HALF + rd, cache_modifier=".cg")
        k1r = k1 * c - k2 * s_
        k2r = k2 * c + k1 * s_
        v1 = tl.load(QKV + vb + rd, cache_modifier=".cg")
        v2 = tl.load(QKV + vb + HALF + rd, cache_modifier=".cg")
        # the cache's keys and values are rounded to its dtype: so are the new ones, as the next step reads them
        k1r = k1r.to(KC.dtype.element_ty).to(tl.float32)
        k2r = k2r.to(KC.dtype.element_ty).to(tl.float32)
        v1 = v1.to(VC.dtype.element_ty).to(tl.float32)
        v2 = v2.to(VC.dtype.element_ty).to(tl.float32)
        p = s * BLK + rp
        old = (p < pos)[:, None]
        now = (p == pos)[:, None]
        off = ((layer * HKV + h) * MAXLEN + p)[:, None] * HD + rd[None, :]
        K1 = tl.where(now, k1r[None, :], tl.load(KC + off, mask=old, other=0.0).to(tl.float32))
        K2 = tl.where(now, k2r[None, :], tl.load(KC + off + HALF, mask=old, other=0.0).to(tl.float32))
        V1 = tl.where(now, v1[None, :], tl.load(VC + off, mask=old, other=0.0).to(tl.float32))
        V2 = tl.where(now, v2[None, :], tl.load(VC + off + HALF, mask=old, other=0.0).to(tl.float32))
        sc = tl.sum(q1r[:, None, :] * K1[None, :, :], 2) + tl.sum(q2r[:, None, :] * K2[None, :, :], 2)
        sc = tl.where((p <= pos)[None, :], sc, float("-inf"))
        m = tl.max(sc, 1)
        e = tl.exp(sc - tl.where(m == float("-inf"), 0.0, m)[:, None])
        ln = tl.sum(e, 1)
        a1 = tl.sum(e[:, :, None] * V1[None, :, :], 1)
        a2 = tl.sum(e[:, :, None] * V2[None, :, :], 1)
        ph = (h * GRP + rg) * S + s
        tl.store(PM + ph, m)
        tl.store(PL + ph, ln)
        tl.store(PA + ph[:, None] * HD + rd[None, :], a1)
        tl.store(PA + ph[:, None] * HD + HALF + rd[None, :], a2)
        if (pos >= s * BLK) & (pos < s * BLK + BLK):
            at = ((layer * HKV + h) * MAXLEN + pos) * HD
            tl.store(KC + at + rd, k1r.to(KC.dtype.element_ty))
            tl.store(KC + at + HALF + rd, k2r.to(KC.dtype.element_ty))
            tl.store(VC + at + rd, v1.to(VC.dtype.element_ty))
            tl.store(VC + at + HALF + rd, v2.to(VC.dtype.element_ty))


@triton.jit
def _o_product(WO, PM, PL, PA, X, WS, CNT, pid, G, H: tl.constexpr, HQ: tl.constexpr, HD: tl.constexpr,
               S: tl.constexpr, BN: tl.constexpr, STAGES: tl.constexpr, DET: tl.constexpr):
    """X += Wo · attention, in tiles [BN, HD] (one query head's columns): each tile combines its
    head's S partial sums first (S × (HD + 2) floats from L2)."""
    nb: tl.constexpr = H // BN
    rn = tl.arange(0, BN)
    rd = tl.arange(0, HD)
    rs = tl.arange(0, S)
    for t in tl.range(pid, nb * HQ, G, num_stages=STAGES):
        n0 = (t % nb) * BN
        hq = t // nb
        w = tl.load(WO + (n0 + rn)[:, None] * H + hq * HD + rd[None, :], eviction_policy="evict_first")
        m = tl.load(PM + hq * S + rs, cache_modifier=".cg")
        ln = tl.load(PL + hq * S + rs, cache_modifier=".cg")
        a = tl.load(PA + (hq * S + rs)[:, None] * HD + rd[None, :], cache_modifier=".cg")
        wt = tl.exp(m - tl.max(m, 0))
        att = tl.sum(wt[:, None] * a, 0) / tl.sum(wt * ln, 0)
        part = tl.sum(w.to(tl.float32) * att[None, :], 1)
        _add_tile(X, WS, part, n0, rn, hq, H, DET)
    _settle(X, WS, CNT, pid, G, nb * HQ, nb, HQ, H, BN, DET)


@triton.jit
def _embed(TOK, EMB, X, ACC_QKV, LOGITS, pid, G, H: tl.constexpr, NQKV: tl.constexpr, V: tl.constexpr,
           ZB: tl.constexpr):
    tok = tl.load(TOK)
    r = tl.arange(0, ZB)
    for i in range(pid * ZB, H, G * ZB):
        tl.store(X + i + r, tl.load(EMB + tok * H + i + r, mask=i + r < H).to(tl.float32), mask=i + r < H)
    _zero(ACC_QKV, NQKV, pid, G, ZB)
    _zero(LOGITS, V, pid, G, ZB)


@triton.jit
def _layer_phase(P: tl.constexpr, layer, pid, G, pos,
                 WQKV, WO, WGU, WD, LN1, LN2, KC, VC, COS, SIN,
                 X, ACC_QKV, ACC_GU, PM, PL, PA, WS, CNT, eps, scale,
                 H: tl.constexpr, HP: tl.constexpr, I: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                 HD: tl.constexpr, MAXLEN: tl.constexpr, S: tl.constexpr, BLK: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, BN_O: tl.constexpr, ZB: tl.constexpr, STAGES: tl.constexpr,
                 DET: tl.constexpr):
    NQKV: tl.constexpr = (HQ + 2 * HKV) * HD
    if P == 1:
        _zero(ACC_GU, 2 * I, pid, G, ZB)
        r = _rstd(X, H, HP, eps)
        _gemv(WQKV + layer.to(tl.int64) * NQKV * H, NQKV, H, X, r, LN1 + layer * H, WS, CNT, ACC_QKV, pid, G,
              0, BN, BK, STAGES, DET)
    if P == 2:
        _attention(ACC_QKV, KC, VC, PM, PL, PA, COS, SIN, pos, layer, pid, G, scale, MAXLEN, HQ, HKV, HD, S, BLK)
    if P == 3:
        _zero(ACC_QKV, NQKV, pid, G, ZB)
        _o_product(WO + layer.to(tl.int64) * H * H, PM, PL, PA, X, WS, CNT, pid, G, H, HQ, HD, S, BN_O, STAGES, DET)
    if P == 4:
        r = _rstd(X, H, HP, eps)
        _gemv(WGU + layer.to(tl.int64) * 2 * I * H, 2 * I, H, X, r, LN2 + layer * H, WS, CNT, ACC_GU, pid, G,
              0, BN, BK, STAGES, DET)
    if P == 5:
        _gemv(WD + layer.to(tl.int64) * H * I, H, I, ACC_GU, 1.0, LN2, WS, CNT, X, pid, G, 1, BN, BK, STAGES, DET)


@triton.jit(do_not_specialize=["only_layer"])
def mega_step(TOK, POS, EMB, WQKV, WO, WGU, WD, LN1, LN2, NORM, HEAD, KC, VC, COS, SIN,
              X, ACC_QKV, ACC_GU, PM, PL, PA, LOGITS, WS, CNT, CTR, ERR, TIMES, eps, scale, only_layer,
              NL, H: tl.constexpr, HP: tl.constexpr, I: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
              HD: tl.constexpr, V: tl.constexpr, MAXLEN: tl.constexpr, S: tl.constexpr, BLK: tl.constexpr,
              BN: tl.constexpr, BK: tl.constexpr, BN_O: tl.constexpr, ZB: tl.constexpr, STAGES: tl.constexpr,
              ONLY: tl.constexpr, LIMIT: tl.constexpr, TIMED: tl.constexpr, PF: tl.constexpr,
              DET: tl.constexpr):
    """One decode step of one sequence (token TOK[0] at position POS[0]); logits into LOGITS.
    ONLY < 0: every phase, grid barriers between (all programs must be resident: G ≤ SMs).
    ONLY = 0 embed, 1–5 a phase of layer `only_layer`, 6 the head: one phase, no barrier."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    pos = tl.load(POS)
    NQKV: tl.constexpr = (HQ + 2 * HKV) * HD
    if ONLY < 0:
        _stamp(TIMES, 0, pid, TIMED)
        _embed(TOK, EMB, X, ACC_QKV, LOGITS, pid, G, H, NQKV, V, ZB)
        _prefetch(WQKV, NQKV, H, pid, G, BN, BK, PF)
        _sync(CTR, G, ERR, LIMIT)
        _stamp(TIMES, 1, pid, TIMED)
        for layer in range(NL):
            lo = layer.to(tl.int64)
            for P in tl.static_range(1, 6):
                _layer_phase(P, layer, pid, G, pos, WQKV, WO, WGU, WD, LN1, LN2, KC, VC, COS, SIN, X, ACC_QKV,
                             ACC_GU, PM, PL, PA, WS, CNT, eps, scale, H, HP, I, HQ, HKV, HD, MAXLEN, S, BLK, BN, BK,
                             BN_O, ZB, STAGES, DET)
                # the first tiles of the product after the barrier (o's already before the attention)
                if P == 1:
                    _prefetch(WO + lo * H * H, H, H, pid, G, BN_O, HD, PF)
                if P == 3:
                    _prefetch(WGU + lo * 2 * I * H, 2 * I, H, pid, G, BN, BK, PF)
                if P == 4:
                    _prefetch(WD + lo * H * I, H, I, pid, G, BN, BK, PF)
                if P == 5:
                    if layer + 1 < NL:
                        _prefetch(WQKV + (lo + 1) * NQKV * H, NQKV, H, pid, G, BN, BK, PF)
                    else:
                        _prefetch(HEAD, V, H, pid, G, BN, BK, PF)
                _sync(CTR, (1 + 5 * layer + P) * G, ERR, LIMIT)
                _stamp(TIMES, 1 + 5 * layer + P, pid, TIMED)
        r = _rstd(X, H, HP, eps)
        _gemv(HEAD, V, H, X, r, NORM, WS, CNT, LOGITS, pid, G, 0, BN, BK, STAGES, DET)
        if TIMED:  # the head's end: every program's last tile added
            _sync(CTR, (2 + 5 * NL) * G, ERR, LIMIT)
            _stamp(TIMES, 2 + 5 * NL, pid, TIMED)
    else:
        if ONLY == 0:
            _embed(TOK, EMB, X, ACC_QKV, LOGITS, pid, G, H, NQKV, V, ZB)
        if ONLY >= 1 and ONLY <= 5:
            _layer_phase(ONLY, only_layer, pid, G, pos, WQKV, WO, WGU, WD, LN1, LN2, KC, VC, COS, SIN, X,
                         ACC_QKV, ACC_GU, PM, PL, PA, WS, CNT, eps, scale, H, HP, I, HQ, HKV, HD, MAXLEN, S, BLK, BN,
                         BK, BN_O, ZB, STAGES, DET)
        if ONLY == 6:
            r = _rstd(X, H, HP, eps)
            _gemv(HEAD, V, H, X, r, NORM, WS, CNT, LOGITS, pid, G, 0, BN, BK, STAGES, DET)
