"""Precision `int8`: post-training static INT8 in explicit Q/DQ form (what it writes: the table in
quantize.py's docstring; why each choice, with measurements: docs/quantization.md).

* :class:`KVCalibrationReader`: real prefill and decode inputs (with past KV) for the calibrator;
* :func:`smooth_and_clip`: SmoothQuant, per activation where it lowers the simulated INT8 error;
* :func:`quantize_int8_static`: both, then ONNX Runtime's ``quantize_static`` (MinMax, symmetric,
  per-channel weights, Q/DQ on the linear layers' inputs only).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .onnx_files import all_tensors, link_or_copy, save_onnx, toposort
from .precision import ProgressFn, QuantizationError
from .text import bos_id, encode


@dataclass
class Int8Options:
    """Knobs of the static INT8 path (defaults chosen by the measurements in docs/quantization.md)."""

    window: int = 128                          # tokens per calibration prefill
    max_windows: int = 16                      # prefills fed (each followed by `decode_steps` decodes)
    decode_steps: int = 3
    quantize_lm_head: bool = True
    search: bool = True                        # SmoothQuant per activation where it helps (else plain MinMax)
    # migration strengths tried per activation (plus none). A wider grid, (0.3, ..., 0.8), lowers the
    # simulated per-layer error but raised the end-to-end KL divergence (docs/quantization.md)
    alphas: Sequence[float] = (0.5,)
    # activation range = clip x calibrated max; (1.0,) = no clipping. A clipping grid such as
    # (1.0, 0.9, 0.8, 0.7) lowers the simulated error but measured worse (docs/quantization.md)
    clips: Sequence[float] = (1.0,)
    exclude_nodes: Sequence[str] = field(default_factory=tuple)
    target_pct: float | None = None            # calibration-text perplexity increase that triggers a fallback
    max_fallback: int = 4                      # at most this many activation groups kept in float


class KVCalibrationReader:
    """Feeds real prefill and decode inputs to the ORT calibrator.

    The text is cut into windows; each window gives one prefill (past length 0) and then
    `decode_steps` single-token decodes whose past KV is what the FP32 graph produced for the
    window so far, so every calibrated activation range covers both shapes the server runs.
    """

    def __init__(self, fp32_model: Path, token_ids: Sequence[int], spec: dict, *, window: int = 128,
                 max_windows: int = 16, decode_steps: int = 3, bos: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        max_ctx = int(spec.get("max_position_embeddings") or 2048)
        window = max(4, min(window, max_ctx - 1))
        self.decode_steps = max(0, min(decode_steps, window // 2))
        ids = list(token_ids)
        if len(ids) < 4:
            raise QuantizationError("calibration text is too short (fewer than 4 tokens)")
        body = window - (1 if bos is not None else 0)
        starts = list(range(0, max(1, len(ids) - body + 1), body))
        if len(starts) > max_windows:  # spread the windows over the whole text
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
        self.windows = []
        for s in starts:
            w = ids[s:s + body]
            if bos is not None:
                w = [bos] + w
            if len(w) >= 2:
                self.windows.append(np.asarray(w, dtype=np.int64))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(fp32_model), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32
        n = spec["num_layers"]
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self._it = self._feeds()

    def __len__(self) -> int:
        return len(self.windows) * (1 + self.decode_steps)

    def _feeds(self) -> Iterator[dict]:
        h, d = self.spec["num_kv_heads"], self.spec["head_dim"]
        for w in self.windows:
            steps = min(self.decode_steps, len(w) - 1)
            p = len(w) - steps
            empty = np.zeros((1, h, 0, d), dtype=self.kv_dtype)
            feeds = {"input_ids": w[None, :p], "attention_mask": np.ones((1, p), np.int64),
                     "position_ids": np.arange(p, dtype=np.int64)[None], **{n: empty for n in self.past_names}}
            yield feeds
            past = None
            for t in range(p, len(w)):
                if past is None:
                    past = self.session.run(self.present_names, feeds)
                feeds = {"input_ids": w[None, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                         "position_ids": np.array([[t]], np.int64), **dict(zip(self.past_names, past))}
                yield feeds
                if t + 1 < len(w):
                    past = self.session.run(self.present_names, feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()


def linear_matmul_nodes(model) -> list:
    """MatMul/Gemm nodes whose weight (input B) is an initializer: the model's linear layers."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in consts)]


def lm_head_node(model) -> str | None:
    """The last linear layer feeding `logits` (the LM head), by walking back from the output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    linear = {n.name for n in linear_matmul_nodes(model)}
    frontier, seen = ["logits"], set()
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in linear:
            return node.name
        frontier.extend(node.input[:1])
    return None


def _fake_quant_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric INT8, one scale per output column of W[K, N] (what the Q/DQ graph does)."""
    scale = np.maximum(np.abs(w).max(0, keepdims=True), 1e-12) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _fake_quant_act(x: np.ndarray, amax: float) -> np.ndarray:
    scale = max(float(amax), 1e-12) / 127.0
    return np.clip(np.round(x / scale), -127, 127) * scale


def smooth_and_clip(model, reader: "KVCalibrationReader", *, alphas: Sequence[float] = (0.5,),
                    clips: Sequence[float] = (1.0,), exclude: set[str] = frozenset(),
                    max_rows: int = 512, max_cols: int = 2048, seed: int = 0, source: Path | None = None,
                    work_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """SmoothQuant (Xiao et al., 2023) with a searched migration strength and activation clipping,
    on the ONNX graph in place.

    For each activation x feeding linear layers (the q/k/v trio, gate/up, o_proj, down_proj, the
    LM head) and each candidate alpha, the per-input-channel scales are
    s_j = max|x_j|^alpha / max|W_j.|^(1-alpha); the weights' rows are multiplied by s and x divided
    by s -- folded into the norm's weight when x is `norm * w`, else by one inserted Mul. The
    float function is unchanged; activation outliers, which one per-tensor INT8 scale handles badly,
    move into the weights, which have one scale per column. The alpha (or no smoothing) and the
    clipping of x's range (a fraction of its calibrated max) are chosen together to minimise the
    relative error of the INT8-simulated outputs x.W on calibration rows.

    `source`/`work_dir`: the graph file `model` was loaded from (unchanged so far) and a scratch
    folder, to run the statistics pass from the file rather than from an in-memory copy.

    Returns (TensorQuantOverrides for quantize_static: the chosen symmetric range of each
    activation, one record per activation: its linear nodes, alpha, clip and simulated error).
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, list] = {}
    for n in linear_matmul_nodes(model):
        if n.op_type == "MatMul" and n.input[1] in inits and n.name not in exclude:
            groups.setdefault(n.input[0], []).append(n)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = {x: [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in ns] for x, ns in groups.items()}
    # x may also feed Shape ops (its values do not matter there), nothing else
    groups = {x: ns for x, ns in groups.items()
              if sum(c.op_type != "Shape" for c in consumers.get(x, ())) == len(ns)
              and all(w.ndim == 2 for w in weights[x])}
    if not groups:
        return {}, []

    # calibration rows of every x (and its per-channel |max| over all rows) from the FP32 graph
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if source is not None and work_dir is not None:
        # the graph file (structure only) with x as extra outputs, beside links to its weights:
        # no copy of the weights in memory and no 2 GB protobuf limit
        probe = onnx.load(str(source), load_external_data=False)
        for x in groups:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
        probe_dir = Path(work_dir) / "probe"
        probe_dir.mkdir(exist_ok=True)
        for loc in {e.value for t in all_tensors(probe) for e in t.external_data if e.key == "location"}:
            link_or_copy(Path(source).parent / loc, probe_dir / loc)
        onnx.save_model(probe, str(probe_dir / "probe.onnx"))
        sess = ort.InferenceSession(str(probe_dir / "probe.onnx"), opts, providers=["CPUExecutionProvider"])
    else:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for x in groups:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del probe
    names = list(groups)
    rng = np.random.default_rng(seed)
    per_feed = max(8, 2 * max_rows // max(1, len(reader.windows)))
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list] = {x: [] for x in names}
    reader.rewind()
    for feeds in iter(reader.get_next, None):
        for x, v in zip(names, sess.run(names, feeds)):
            v = v.reshape(-1, v.shape[-1])
            m = np.abs(v).max(0)
            amax[x] = m if x not in amax else np.maximum(amax[x], m)
            pick = v if len(v) <= per_feed else v[rng.choice(len(v), per_feed, replace=False)]
            rows[x].append(pick)
    reader.rewind()
    del sess

    producers = {o: n for n in model.graph.node for o in n.output}
    overrides, log, new_nodes = {}, [], []
    for x, ns in groups.items():
        X = np.concatenate(rows.pop(x))
        if len(X) > max_rows:
            X = X[rng.choice(len(X), max_rows, replace=False)]
        w_max = np.max([np.abs(w).max(1) for w in weights[x]], axis=0)
        # the search sees at most `max_cols` output columns of each weight (each column has its own
        # scale, so a subset of columns measures exactly what it measures): the LM head stays cheap
        cols = [np.sort(rng.choice(w.shape[1], max_cols, replace=False)) if w.shape[1] > max_cols else slice(None)
                for w in weights[x]]
        search_w = [w[:, c] for w, c in zip(weights[x], cols)]
        refs = [X @ w for w in search_w]
        norms = [max(float((r * r).sum()), 1e-12) for r in refs]
        best = None
        for alpha in (None, *alphas):
            if alpha is None:
                scale = np.ones_like(w_max)
            else:
                scale = (np.maximum(amax[x], 1e-5) ** alpha) / (np.maximum(w_max, 1e-5) ** (1 - alpha))
                scale = np.clip(scale, 1e-3, 1e3).astype(np.float32)
            wq = [_fake_quant_weight(w * scale[:, None]) for w in search_w]
            xs = X / scale
            top = float((amax[x] / scale).max())
            for c in clips:
                xq = _fake_quant_act(xs, c * top)
                err = sum(float(((xq @ w - r) ** 2).sum()) / nr for w, r, nr in zip(wq, refs, norms))
                if best is None or err < best[0]:
                    best = (err, alpha, scale, c * top, c)
        err, alpha, scale, act_max, clip = best
        log.append({"activation": x, "nodes": [n.name for n in ns], "alpha": alpha, "clip": clip,
                    "error": err / len(ns)})
        quantized_input = x
        if alpha is not None:
            for n, w in zip(ns, weights[x]):
                t = inits[n.input[1]]
                t.CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(np.float32), t.name))
            prod = producers.get(x)
            gamma = None
            if prod is not None and prod.op_type == "Mul":
                gamma = next((i for i in prod.input if i in inits and numpy_helper.to_array(inits[i]).shape == scale.shape
                              and len(consumers.get(i, ())) == 1), None)
            if gamma is not None:  # fold into the norm's weight
                g = numpy_helper.to_array(inits[gamma])
                inits[gamma].CopyFrom(numpy_helper.from_array((g / scale).astype(g.dtype), gamma))
            else:
                inv, quantized_input = x + "_smooth_inv_scale", x + "_smoothed"
                model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv))
                new_nodes.append(onnx.helper.make_node("Mul", [x, inv], [quantized_input], name=x + "_smooth"))
                for n in ns:
                    n.input[0] = quantized_input
        overrides[quantized_input] = [{"rmin": np.array(-act_max, np.float32), "rmax": np.array(act_max, np.float32)}]
    if new_nodes:
        model.graph.node.extend(new_nodes)
        toposort(model)
    return overrides, log


def quantize_int8_static(onnx_in: Path, onnx_out: Path, text: str, tokenizer, spec: dict,
                         options: Int8Options, *, work_dir: Path, progress: ProgressFn) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # the quantizer wants one self-contained path; stage the FP32 graph (weights external)
    src = work_dir / "fp32" / "model.onnx"
    src.parent.mkdir()
    model = onnx.load(str(onnx_in), load_external_data=True)
    if model.graph.input[3].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise QuantizationError("int8 quantization starts from the FP32 graph")
    exclude = set(options.exclude_nodes)
    linear = [n.name for n in linear_matmul_nodes(model)]
    if not options.quantize_lm_head:
        head = lm_head_node(model)
        if head:
            exclude.add(head)

    ids = encode(tokenizer, text)
    # past KV for the decode feeds comes from the unmodified FP32 graph (smoothing does not change it)
    reader = KVCalibrationReader(onnx_in, ids, spec, window=options.window, max_windows=options.max_windows,
                                 decode_steps=options.decode_steps, bos=bos_id(tokenizer))
    progress(f"calibrating INT8 on {len(ids)} tokens ({len(reader.windows)} prefills, each followed by "
             f"{reader.decode_steps} decodes)")
    overrides, records = {}, []
    if options.search:
        overrides, records = smooth_and_clip(model, reader, alphas=options.alphas, clips=options.clips,
                                             exclude=exclude, source=onnx_in, work_dir=work_dir)
        smoothed = sum(r["alpha"] is not None for r in records)
        progress(f"SmoothQuant: {smoothed}/{len(records)} activations smoothed (where it lowers the simulated error)")
    save_onnx(model, src, threshold_bytes=0)  # (moves the weights out of `model`)
    del model
    extra = {
        "ActivationSymmetric": True,      # TensorRT takes zero-point 0 only
        "WeightSymmetric": True,
        # Q/DQ on the inputs of the linear layers only (what TensorRT fuses into INT8 GEMMs): no Q/DQ
        # on their outputs, none on attention's Q.K^T / P.V (nodes_to_quantize lists the linear layers)
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
        # one Q/DQ pair per consumer: ONNX Runtime fuses DQ -> MatMul into its INT8 kernel
        # (MatMulIntegerToFloat) only when the DQ feeds that MatMul alone (q/k/v, gate/up share x)
        "DedicatedQDQPair": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},   # one scale per output column of W[K, N]
    }
    if overrides:
        extra["TensorQuantOverrides"] = overrides

    ref_ppl = calibration_perplexity(src, reader) if options.target_pct is not None else None
    # accuracy-aware fallback: while the calibration-text perplexity is off by more than target_pct,
    # keep the linear layers with the largest simulated INT8 error in float, one activation group a time
    fallback = sorted(records, key=lambda r: -r["error"])
    out = work_dir / "q" / "model.onnx"
    for attempt in range(options.max_fallback + 1):
        if out.parent.exists():
            shutil.rmtree(out.parent)
        out.parent.mkdir()
        reader.rewind()
        quantize_static(
            str(src), str(out), reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=[n for n in linear if n not in exclude],
            nodes_to_exclude=sorted(exclude),
            use_external_data_format=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
        )
        if ref_ppl is None:
            break
        ppl = calibration_perplexity(out, reader)
        delta = 100.0 * (ppl / ref_ppl - 1.0)
        progress(f"INT8 calibration-text perplexity {ppl:.4f} vs {ref_ppl:.4f} FP32 ({delta:+.2f} %)"
                 + (f", {len(exclude)} linear layers kept in float" if exclude else ""))
        if delta <= options.target_pct or not fallback or attempt == options.max_fallback:
            break
        worst = fallback.pop(0)
        exclude.update(worst["nodes"])
        progress(f"keeping {', '.join(worst['nodes'])} in float (largest simulated INT8 error)")
    model = onnx.load(str(out), load_external_data=True)
    _unshare_activation_qdq(model)
    save_onnx(model, onnx_out)


def _unshare_activation_qdq(model) -> None:
    """Give every activation Q/DQ pair its own scale and zero-point initializers. With shared ones,
    ONNX Runtime's common-subexpression elimination merges the dedicated Q nodes of q/k/v (and
    gate/up) into one Q feeding several DQs, and its x86 INT8 fusion (S8->U8 conversion, then
    MatMulIntegerToFloat) no longer applies: those MatMuls would dequantize their weights on every
    run. Same values under new names; TensorRT reads the same graph."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for k, q in enumerate(n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        if q.input[0] in inits or len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
            continue
        names = []
        for j in (1, 2):
            t = type(inits[q.input[j]])()
            t.CopyFrom(inits[q.input[j]])
            t.name = f"{q.input[j]}_q{k}"
            model.graph.initializer.append(t)
            names.append(t.name)
        old = list(q.input[1:3])
        q.input[1], q.input[2] = names
        for dq in consumers.get(q.output[0], ()):
            if dq.op_type == "DequantizeLinear" and list(dq.input[1:3]) == old:
                dq.input[1], dq.input[2] = names
    used = {i for n in model.graph.node for i in n.input}
    stale = [t for t in model.graph.initializer if t.name not in used]
    for t in stale:
        model.graph.initializer.remove(t)


def calibration_perplexity(model_path: Path, reader: "KVCalibrationReader") -> float:
    """Perplexity of the graph on the calibration windows (prefill logits, past length 0)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    h, d = reader.spec["num_kv_heads"], reader.spec["head_dim"]
    empty = np.zeros((1, h, 0, d), dtype=reader.kv_dtype)
    nll, count = 0.0, 0
    for w in reader.windows:
        n = len(w)
        logits = sess.run(["logits"], {"input_ids": w[None], "attention_mask": np.ones((1, n), np.int64),
                                       "position_ids": np.arange(n, dtype=np.int64)[None],
                                       **{p: empty for p in reader.past_names}})[0][0, :-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
        nll += float((lse - logits[np.arange(n - 1), w[1:]]).sum())
        count += n - 1
    return float(np.exp(nll / max(count, 1)))
