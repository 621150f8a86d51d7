#!/usr/bin/env python3
"""The one-kernel decode step (benchmarks/megakernel.py) against the engine's graph-captured step.

  1. check: the kernel's logits for one new token against transformers in float32 over the whole
     sequence (the context's K/V taken from transformers' own cache), the per-phase launches first,
     then each fused configuration (its barrier counter, and whether a second step repeats the logits);
  2. time: the kernel (one launch, captured in a CUDA graph with the counter's memset before it)
     against the engine's one-row step graph (`triton+graphs`, the same seeded model and context),
     the copy bandwidth's bound, and each phase's share (program 0's global timer at the barriers).
Measured on an H200: docs/benchmarks-gpu.md, "Thirty-second session".

On a GPU (TinyLlama-1.1B's shape, bf16, context 128):
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_megakernel.py --out $OUT
On a CPU, the math alone under the Triton interpreter (a tiny model, one launch per phase), and the
fused kernel compiled for sm_90 with what its SASS says (tests/test_megakernel.py runs both):
    TRITON_INTERPRET=1 python3 benchmarks/gpu_megakernel.py --tiny
    python3 benchmarks/gpu_megakernel.py --compile-hopper 0:32:256:128:3:8:2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch

from megakernel import mega_step
from tritonchat.python_backend.engines.torch.kernels import next_pow2

LIMIT = 1 << 16  # spins before a barrier gives up (a program that never comes must not hang the GPU)


class MegaStep:
    """The stacked weights, one sequence's K/V cache and the kernel's buffers for a Llama model."""

    def __init__(self, model, max_len: int, programs: int, bn=32, bk=256, bn_o=128, blk=64, stages=2,
                 warps=8, pf=0, det=False):
        cfg = model.config
        dev, dt = model.device, model.dtype
        self.H, self.I = cfg.hidden_size, cfg.intermediate_size
        self.HQ, self.HKV = cfg.num_attention_heads, cfg.num_key_value_heads
        self.HD = getattr(cfg, "head_dim", None) or self.H // self.HQ
        self.V, self.NL = cfg.vocab_size, cfg.num_hidden_layers
        self.eps = float(cfg.rms_norm_eps)
        self.max_len, self.G, self.blk, self.pf, self.det = max_len, programs, blk, pf, det
        self.bn, self.bk, self.bn_o, self.stages, self.warps = bn, min(bk, self.H), bn_o, stages, warps
        assert self.I % self.bk == 0 and (self.HQ + 2 * self.HKV) * self.HD % bn == 0 and self.H % bn_o == 0
        layers = model.model.layers
        with torch.no_grad():
            def stack(f):
                return torch.stack([f(L) for L in layers]).contiguous()
            self.wqkv = stack(lambda L: torch.cat([L.self_attn.q_proj.weight, L.self_attn.k_proj.weight,
                                                   L.self_attn.v_proj.weight], 0))
            self.wo = stack(lambda L: L.self_attn.o_proj.weight)
            self.wgu = stack(lambda L: torch.cat([L.mlp.gate_proj.weight, L.mlp.up_proj.weight], 0))
            self.wd = stack(lambda L: L.mlp.down_proj.weight)
            self.ln1 = stack(lambda L: L.input_layernorm.weight)
            self.ln2 = stack(lambda L: L.post_attention_layernorm.weight)
            self.norm = model.model.norm.weight.detach().contiguous()
            self.head = model.lm_head.weight.detach().contiguous()
            self.emb = model.model.embed_tokens.weight.detach().contiguous()
            pos = torch.arange(max_len, device=dev)[None]
            cos, sin = model.model.rotary_emb(torch.zeros(1, device=dev, dtype=torch.float32), pos)
            half = self.HD // 2
            self.cos = cos[0, :, :half].float().contiguous()
            self.sin = sin[0, :, :half].float().contiguous()
        self.kc = torch.zeros(self.NL, self.HKV, max_len, self.HD, device=dev, dtype=dt)
        self.vc = torch.zeros_like(self.kc)
        f32 = dict(device=dev, dtype=torch.float32)
        nqkv = (self.HQ + 2 * self.HKV) * self.HD
        self.S = max_len // blk
        self.x = torch.zeros(self.H, **f32)
        self.acc_qkv = torch.zeros(nqkv, **f32)
        self.acc_gu = torch.zeros(2 * self.I, **f32)
        self.pm = torch.zeros(self.HQ * self.S, **f32)
        self.pl = torch.zeros(self.HQ * self.S, **f32)
        self.pa = torch.zeros(self.HQ * self.S * self.HD, **f32)
        self.logits = torch.zeros(self.V, **f32)
        self.ctr = torch.zeros(1, device=dev, dtype=torch.int32)
        self.err = torch.zeros(1, device=dev, dtype=torch.int32)
        self.tok = torch.zeros(1, device=dev, dtype=torch.int64)
        self.pos = torch.zeros(1, device=dev, dtype=torch.int64)
        self.times = torch.zeros(3 + 5 * self.NL, device=dev, dtype=torch.int64)
        # DET: each product's k-slices in a workspace, added in order by the last to arrive (counters)
        slices = max(nqkv * (self.H // self.bk), 2 * self.I * (self.H // self.bk), self.H * (self.I // self.bk),
                     self.H * self.HQ, self.V * (self.H // self.bk))
        self.ws = torch.zeros(slices, **f32)
        self.cnt = torch.zeros(max(nqkv, 2 * self.I, self.V) // min(bn, bn_o) + 1, device=dev, dtype=torch.int32)

    def load_cache(self, past, n: int) -> None:
        """The first `n` positions' K/V from a transformers cache (rotated keys, as this kernel keeps)."""
        for i in range(self.NL):
            k, v = past.layers[i].keys, past.layers[i].values
            self.kc[i, :, :n] = k[0, :, :n]
            self.vc[i, :, :n] = v[0, :, :n]

    def _launch(self, only: int, layer: int = 0, timed: bool = False) -> None:
        mega_step[(self.G,)](
            self.tok, self.pos, self.emb, self.wqkv, self.wo, self.wgu, self.wd, self.ln1, self.ln2, self.norm,
            self.head, self.kc, self.vc, self.cos, self.sin, self.x, self.acc_qkv, self.acc_gu, self.pm,
            self.pl, self.pa, self.logits, self.ws, self.cnt, self.ctr, self.err, self.times, self.eps,
            self.HD ** -0.5, layer, self.NL,
            H=self.H, HP=next_pow2(self.H), I=self.I, HQ=self.HQ, HKV=self.HKV, HD=self.HD, V=self.V,
            MAXLEN=self.max_len, S=self.S, BLK=self.blk, BN=self.bn, BK=self.bk, BN_O=self.bn_o, ZB=256,
            STAGES=self.stages, ONLY=only, LIMIT=LIMIT, TIMED=timed, PF=self.pf, DET=self.det, num_warps=self.warps)

    def step(self) -> None:
        """The whole step in one launch (the token and position already in `tok`, `pos`)."""
        self.ctr.zero_()
        self._launch(-1)

    def phase_times(self, reps: int = 20) -> dict:
        """Where a step's time goes: program 0's global timer at every barrier (one more barrier after
        the head), median over `reps` steps, in µs: the embedding, each phase summed over the layers,
        the head."""
        import statistics
        runs = []
        for _ in range(reps):
            self.ctr.zero_()
            self._launch(-1, timed=True)
            torch.cuda.synchronize()
            t = self.times.double().cpu()
            d = (t[1:] - t[:-1]) / 1e3
            layers = d[1:1 + 5 * self.NL].reshape(self.NL, 5).sum(0)
            runs.append([float(d[0]), *map(float, layers), float(d[-1]), float(t[-1] - t[0]) / 1e3])
        names = ["embed", "qkv", "attention", "o", "gate_up", "down", "head", "total"]
        return {n: round(statistics.median(r[i] for r in runs), 2) for i, n in enumerate(names)}

    def step_phases(self) -> None:
        """The same, one launch per phase (no barrier: what the interpreter can run)."""
        self._launch(0)
        for layer in range(self.NL):
            for p in range(1, 6):
                self._launch(p, layer)
        self._launch(6)


def compile_hopper(spec: str) -> dict:
    """The fused kernel (TinyLlama's shape, one configuration as --configs gives it) compiled for
    sm_90 without a GPU, and what its SASS says: registers and stack, shared memory, whether each
    barrier's counter atomics run on one thread only (predicated: a program counts itself once),
    and the L2 prefetches and pipelined weight loads the configuration asks for."""
    import re
    import subprocess

    import triton
    from triton.runtime import driver
    from tune_compile import Hopper  # what the JIT asks the active driver before a launch, for an H100

    driver.set_active(Hopper())
    g, bn, bk, bn_o, stages, warps, pf, det = ([int(v) for v in spec.split(":")] + [0, 0])[:8]
    H, I, HQ, HKV, HD, V, NL, ML, BLK = 2048, 5632, 32, 4, 64, 32000, 22, 256, 64
    nqkv, S = (HQ + 2 * HKV) * HD, ML // BLK

    def e(*shape, dt=torch.bfloat16):
        return torch.empty(*shape, dtype=dt)
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    k = mega_step.warmup(
        e(1, dt=i64), e(1, dt=i64), e(V, H), e(NL, nqkv, H), e(NL, H, H), e(NL, 2 * I, H), e(NL, H, I), e(NL, H),
        e(NL, H), e(H), e(V, H), e(NL, HKV, ML, HD), e(NL, HKV, ML, HD), e(ML, HD // 2, dt=f32),
        e(ML, HD // 2, dt=f32), e(H, dt=f32), e(nqkv, dt=f32), e(2 * I, dt=f32), e(HQ * S, dt=f32),
        e(HQ * S, dt=f32), e(HQ * S * HD, dt=f32), e(V, dt=f32), e(8 * V, dt=f32), e(2000, dt=i32), e(1, dt=i32),
        e(1, dt=i32), e(3 + 5 * NL, dt=i64), 1e-5, 0.125, 0, NL, H=H, HP=H, I=I, HQ=HQ, HKV=HKV, HD=HD, V=V,
        MAXLEN=ML, S=S, BLK=BLK, BN=bn, BK=bk, BN_O=bn_o, ZB=256, STAGES=stages, ONLY=-1, LIMIT=LIMIT,
        TIMED=False, PF=pf, DET=bool(det), num_warps=warps, grid=(g or 132,))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"megakernel-{os.getpid()}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    try:
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        cubin.unlink()
    ops = [ln.split("*/", 1)[1].split(";")[0].strip() for ln in sass.splitlines() if "*/" in ln and ";" in ln]
    counter = [op for op in ops if re.search(r"(ATOMG|REDG)\.E\.ADD\.STRONG\.GPU", op) and ".F32" not in op]
    return {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "shared": k.metadata.shared, "counter_atomics": len(counter),
            "counter_atomics_predicated": sum(op.startswith("@P") for op in counter),
            "float_atomics": sum(".F32" in op and ("REDG" in op or "ATOMG" in op) for op in ops),
            "l2_prefetches": sum("CCTL.E.PF2" in op for op in ops),
            "async_copies": sum(op.startswith("LDGSTS") or " LDGSTS" in op for op in ops)}


def tiny_model(device="cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).float().eval()


def reference(model, ids: torch.Tensor):
    """transformers over the whole sequence: the last position's logits in float32, and the model's
    own cache (the kernel starts from all but its last position, whose key it must write)."""
    ref = model if model.dtype == torch.float32 else _float_copy(model)
    with torch.no_grad():
        logits = ref(ids).logits[0, -1].float()
        past = model(ids, use_cache=True).past_key_values
    return logits, past


@functools.lru_cache(maxsize=1)
def _float_copy(model):
    import copy
    return copy.deepcopy(model).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check(model, ms: MegaStep, ctx: int, phases: bool, res: dict, label: str) -> None:
    torch.manual_seed(1)
    ids = torch.randint(3, ms.V, (1, ctx + 1), device=model.device)
    want, past = reference(model, ids)
    ms.load_cache(past, ctx)
    ms.tok.fill_(int(ids[0, -1]))
    ms.pos.fill_(ctx)
    ms.err.zero_()
    (ms.step_phases if phases else ms.step)()
    got = ms.logits.clone()
    (ms.step_phases if phases else ms.step)()  # again: the same logits bit for bit? (DET: must be)
    same = bool(torch.equal(got, ms.logits))
    out = {"rel_vs_fp32": rel(got, want), "argmax_equal": int(got.argmax()) == int(want.argmax()),
           "barrier_timeouts": int(ms.err.item()), "counter": int(ms.ctr.item()),
           "counter_expected": 0 if phases else (1 + 5 * ms.NL) * ms.G, "repeat_bitwise": same}
    # the new token's K/V must be in the cache now, as transformers has them
    out["new_k_rel"] = rel(ms.kc[:, :, ctx].float(), torch.stack([past.layers[i].keys[0, :, ctx] for i in
                                                                  range(ms.NL)]).float())
    res.setdefault("check", {})[label] = out
    print(f"[check {label}] {out}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny model, one launch per phase (interpreter)")
    ap.add_argument("--compile-hopper", metavar="CONFIG", help="compile one --configs entry for sm_90, no GPU; "
                    "print what its SASS says as JSON")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--configs", default="132:32:256:128:2:8",
                    help="comma-separated programs:bn:bk:bn_o:stages:warps[:pf[:det]] (programs 0: the SM count; pf: "
                         "tiles of the next product each program asks L2 for before a barrier; det 1: "
                         "the same sums every run, no float atomics)")
    args = ap.parse_args()
    res: dict = {}
    if args.compile_hopper:
        print(json.dumps(compile_hopper(args.compile_hopper)))
        return
    if args.tiny:
        model = tiny_model()
        for det in (False, True):
            ms = MegaStep(model, max_len=128, programs=4, bn=32, bk=64, bn_o=32, blk=32, warps=4, det=det)
            check(model, ms, 40, True, res, "tiny phases" + (" det" if det else ""))
        print(json.dumps(res))
        return
    out_dir = Path(args.out or os.environ.get("OUT", "."))
    import torch_engine_gpu as te
    from common import build_model, cuda_median_ms

    model = build_model()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res["device"] = torch.cuda.get_device_name(0)
    res["sms"] = sms

    def save():
        (out_dir / "megakernel.json").write_text(json.dumps(res, indent=1))

    res["copy_GBps"] = te.copy_bandwidth() / 1e9  # read + written: what the bound is stated against
    for spec in args.configs.split(","):
        g, bn, bk, bn_o, stages, warps, pf, det = ([int(v) for v in spec.split(":")] + [0, 0])[:8]
        g = g or sms
        label = f"G{g} bn{bn} bk{bk} bno{bn_o} st{stages} w{warps} pf{pf}" + (" det" if det else "")
        try:
            ms = MegaStep(model, max_len=256, programs=g, bn=bn, bk=bk, bn_o=bn_o, stages=stages, warps=warps, pf=pf,
                          det=bool(det))
            if not res.get("check"):
                check(model, ms, args.ctx, True, res, "phases")
            check(model, ms, args.ctx, False, res, label)
            if res["check"][label]["barrier_timeouts"]:  # not every program resident: each step would crawl
                raise RuntimeError("barriers timed out: not timed")
            weight_bytes = sum(t.numel() * t.element_size() for t in (ms.wqkv, ms.wo, ms.wgu, ms.wd, ms.head))
            res["weight_bytes"] = weight_bytes
            ms.pos.fill_(args.ctx)
            t0 = time.perf_counter()
            step_ms = cuda_median_ms(ms.step, 50)
            gr = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                ms.step()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(gr):
                ms.step()
            graph_ms = cuda_median_ms(gr.replay, 200)
            bound = (weight_bytes + 2 * ms.NL * ms.HKV * args.ctx * ms.HD * 2) / (res["copy_GBps"] * 1e6)
            r = {"launch_ms": step_ms, "graph_ms": graph_ms, "bound_ms": bound, "x_bound": graph_ms / bound,
                 "timeouts": int(ms.err.item()), "phases_us": ms.phase_times(), "s": time.perf_counter() - t0}
            res.setdefault("timings", {})[label] = r
            print(f"[{label}] {r}", flush=True)
            del ms, gr
        except Exception as exc:  # noqa: BLE001
            import traceback
            res.setdefault("errors", []).append(f"{label}: {traceback.format_exc()}")
            print(f"[{label}] FAILED {exc}\n{traceback.format_exc()}", flush=True)
        save()
        torch.cuda.empty_cache()
    # the engine's own one-row step on the same model and context
    try:
        import numpy as np
        te_res: dict = {}
        ex = te.prepare(model, "triton+graphs", te_res)
        ex._lengths[:] = args.ctx
        slots = np.zeros(1, dtype=np.int64)
        toks = np.full(1, 5, dtype=np.int64)
        pos = np.full(1, args.ctx, dtype=np.int64)
        with torch.no_grad():
            ex._launch(slots, toks, pos)
            res["engine_step_ms"] = [cuda_median_ms(lambda: ex._launch(slots, toks, pos), 200) for _ in range(3)]
        print(f"[engine triton+graphs] one-row step {res['engine_step_ms']} ms", flush=True)
    except Exception:  # noqa: BLE001
        import traceback
        res.setdefault("errors", []).append(f"engine: {traceback.format_exc()}")
        print(traceback.format_exc(), flush=True)
    save()


if __name__ == "__main__":
    main()
