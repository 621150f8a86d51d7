"""The build config: one YAML file, every key optional (defaults below; every key explained, with an
example: docs/build-config.md).

    max_batch_size: 16          # sequences in flight in the generator; Triton max_batch_size
    max_seq_len: null           # context (prompt + answer); default min(model's, 2048)
    precision: fp32             # fp32 | fp16 | int8 | int8-weight-only; torch engine: fp32 (= dtype) |
                                #   int8-weight-only | fp8 (8-bit weights, products in dtype)
    engine: onnxruntime         # onnxruntime | tensorrt | torch
    graph: auto                 # onnxruntime engine: auto = the fused CPU graph (build/ort_graph.py: KV in
                                #   place) where the model and precision allow (Llama/Mistral, head_dim a
                                #   multiple of 16, fp32 or int8-weight-only), else the TorchScript export;
                                #   export = always the TorchScript export
    kv_cache_dtype: float32     # onnxruntime engine, fused graph: float32 | float16 (half the KV memory;
                                #   the attention in float16 too; the accuracy gate checks it)
    head_screen: true           # onnxruntime engine, fused fp32 graph: an 8-bit copy of the LM head that
                                #   greedy decode steps of up to 4 sequences run instead, each argmax then
                                #   settled exactly from the fp32 head (the same tokens; a file ~11 % larger)
    device: cpu                 # cpu | cuda
    dtype: float32              # torch engine: float32 | float16 | bfloat16
    calibration_data: null      # text file for INT8 calibration (default: built-in sample)
    parity_tolerance: 0.001     # max |logit difference|, ONNX Runtime vs PyTorch (fp32)
    accuracy_bounds:            # allowed relative perplexity increase per precision
      fp16: 0.005
      int8: 0.02
      int8-weight-only: 0.02
      fp8: 0.01
    models:                     # per-model Triton settings, visible in each config.pbtxt
      preprocessing:  {instances: 2, max_queue_delay_microseconds: 500, max_queue_size: 1024}
      generator:      {instances: 1, max_queue_size: 256, threads: 0,
                       stream_interval_ms: 10, stream_responses_per_s: auto, prefill_token_budget: 2048,
                       prefill_wait_ms: 0, mix_prefill: true, mix_tokens: 1024, queue_timeout_ms: 0,
                       prefix_reuse: true, prefill_chunk: 128, pdl: auto, w8a8: auto, dense_kernel: auto,
                       first_token_senders: 0, gil_switch_ms: 5, sample_on_device: true}
                      # no Triton dynamic batcher (the generator batches continuously itself):
                      #   max_queue_size is the length of its own waiting line (full: UNAVAILABLE)
                      # stream_interval_ms: a stream's tokens after the first are sent at most this
                      #   often, as one delta (fewer responses for postprocessing under load)
                      # stream_responses_per_s: all streams together get at most this many responses
                      #   per second (n streams: one each n / rate seconds); auto: 200 per CPU core, at most 800
                      # prefill_token_budget: prompt tokens prefilled together between decode steps
                      # prefill_wait_ms: while others decode, a request may wait this long for more
                      #   requests to share its prefill (0: admitted at the next step; see docs/benchmarks-gpu.md)
                      # queue_timeout_ms: a request waiting longer for a KV-cache slot is refused (0: never)
                      # mix_prefill: torch engine: greedy requests that arrive while others decode are
                      #   prefilled inside the next decode step (up to mix_tokens prompt tokens a step)
                      # sample_on_device: torch engine: sampled or penalised requests (temperature, top_k,
                      #   top_p, repetition / presence / frequency penalties; no bad words) get their tokens
                      #   chosen on the device, so their steps chain and carry prompts as greedy ones do;
                      #   false: their logits come to the host
                      # prefix_reuse: a prompt reuses the KV of its longest prefix a slot still holds
                      #   (multi-turn chat, shared system prompts); ONNX Runtime and torch engines; false: off
                      # prefill_chunk: ONNX Runtime engine: a longer prompt is prefilled this many
                      #   tokens at a time, one piece between two decode steps (0: whole)
                      # pdl: torch engine: the decode step's kernels launched with programmatic
                      #   dependent launch (auto: on Hopper and later; true | false)
                      # w8a8: torch engine, --precision fp8: products of more than 32 rows (prefills,
                      #   steps of many streams) round their input rows to FP8 too and run on the FP8
                      #   tensor cores (auto: where the GPU can, Hopper on; false: weights only)
                      # first_token_senders: threads that send first tokens beside the courier thread
                      #   (each send waits ~1 ms for the server process: streams starting together get
                      #   theirs one send apart); 0: the courier sends them too (on two H100s the senders
                      #   cost 3-7 % of 64-stream tokens/s and gained no TTFT: docs/benchmarks-gpu.md)
                      # gil_switch_ms: how long one thread of the generator's process may hold the GIL
                      #   while another waits for it (Python's switch interval, 5 ms by default): the
                      #   stub's thread taking new requests, the decode loop, the senders (0.5 helped
                      #   a CPU stand-in's TTFT, not the H100's)
                      # dense_kernel: torch engine, bf16/fp16/fp32 weights on CUDA: products of up to 16
                      #   rows (decode steps of few streams) run tritonchat's kernel where the load
                      #   times it faster than cuBLAS (auto); false: cuBLAS always
      postprocessing: {instances: 2, max_queue_delay_microseconds: 200, max_queue_size: 4096}
      ensemble:       {instances: 2, max_queue_size: 256, max_prompt_bytes: 0, max_words: 16, max_word_bytes: 256,
                       cancel_poll_ms: 20, log_requests: 0, detokenize: generator, tokenize: entry,
                       generate: generator}
                      # the public entry (python_backend/entry.py): it runs at most max_batch_size +
                      #   generator.max_queue_size requests at once (shared by its instances); beyond, up
                      #   to max_queue_size wait in Triton's queue, then Triton refuses with UNAVAILABLE
                      #   (HTTP 503). instances: 2, so that a request arriving while one instance hands
                      #   out a batch is taken by the other (with one, Triton 2.51's dynamic batcher
                      #   could leave it queued for 500 ms; docs/benchmarks.md, "The prompt in the entry")
                      # max_prompt_bytes: text_input cap in UTF-8 bytes before tokenization (0: 16 per
                      #   token of context); max_words / max_word_bytes: stop and bad words per request
                      # cancel_poll_ms: how often a running request's cancellation is polled
                      # log_requests: fraction of requests logged as one JSON line (0: none, 1: all)
                      # detokenize: postprocessing (a call to the postprocessing model per generator
                      #   response) | generator (the generator sends each response's text itself, the
                      #   same code: one process hop less per response; docs/build-config.md)
                      # tokenize: preprocessing (a call to the preprocessing model per request) | entry
                      #   (the entry prepares the prompt itself, the same code: one process hop less)
                      # generate: generator (a call to the generator model per request, its responses
                      #   forwarded) | entry (the entry runs the generator's engine in its own process,
                      #   the same code, and each response goes from the engine to the client: one
                      #   process hop less per response; one entry instance; docs/build-config.md)
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

DEFAULTS: dict = {
    "max_batch_size": 16,
    "max_seq_len": None,
    "precision": "fp32",
    "engine": "onnxruntime",
    "graph": "auto",
    "kv_cache_dtype": "float32",
    "head_screen": True,
    "device": "cpu",
    "dtype": "float32",
    "calibration_data": None,
    "parity_tolerance": 1e-3,
    "accuracy_bounds": {"fp16": 0.005, "int8": 0.02, "int8-weight-only": 0.02, "fp8": 0.01},
    "tensorrt": {"workspace_gb": 8, "opt_batch_size": None, "opt_seq_len": 128},
    "models": {
        "preprocessing": {"instances": 2, "max_queue_delay_microseconds": 500, "max_queue_size": 1024},
        "generator": {"instances": 1, "max_queue_size": 256, "threads": 0,
                      "stream_interval_ms": 10, "stream_responses_per_s": "auto", "prefill_token_budget": 2048,
                      "prefill_wait_ms": 0, "mix_prefill": True, "mix_tokens": 1024, "queue_timeout_ms": 0,
                      "prefix_reuse": True, "prefill_chunk": 128, "pdl": "auto", "first_token_senders": 0,
                      "gil_switch_ms": 5, "sample_on_device": True,
                      "w8a8": "auto", "dense_kernel": "auto"},
        "postprocessing": {"instances": 2, "max_queue_delay_microseconds": 200, "max_queue_size": 4096},
        "ensemble": {"instances": 2, "max_queue_size": 256, "max_prompt_bytes": 0, "max_words": 16, "max_word_bytes": 256,
                     "cancel_poll_ms": 20, "log_requests": 0, "detokenize": "generator", "tokenize": "entry",
                     "generate": "generator"},
    },
}

CHOICES = {
    "precision": ("fp32", "fp16", "int8", "int8-weight-only", "fp8"),
    "engine": ("onnxruntime", "tensorrt", "torch"),
    "graph": ("auto", "export"),
    "kv_cache_dtype": ("float32", "float16"),
    "device": ("cpu", "cuda"),
    "dtype": ("float32", "float16", "bfloat16"),
}


class SettingsError(ValueError):
    pass


# settings that no longer exist, with the reason (a plain "unknown setting" would not say why)
RETIRED = {
    "models.generator.max_queue_delay_microseconds":
        "the generator has no Triton dynamic batcher: it batches continuously itself, and Triton's batcher "
        "in front of it delayed requests by a missed wake-up (see model_repository/generator/config.pbtxt)",
    "models.generator.chain_at":
        "choosing the next decode step later in the running one gave no steady gain on an H100 (TTFT p50 at "
        "16 streams within the run-to-run spread over three alternating pairs, worse at 64 streams; "
        "docs/benchmarks-gpu.md, thirty-sixth session)",
}


def _merge(base: dict, over: dict, path: str = "") -> dict:
    for k, v in over.items():
        if f"{path}{k}" in RETIRED:
            raise SettingsError(f"build setting '{path}{k}' was removed: {RETIRED[path + k]}")
        if k not in base:
            raise SettingsError(f"unknown build setting '{path}{k}' (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, f"{path}{k}.")
        else:
            base[k] = v
    return base


def _given(data: dict, *path: str):
    """The value at `path` in a user's settings mapping, or None where it does not set it."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(value, least: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= least


def load_settings(path: Path | None = None, **overrides) -> dict:
    s = copy.deepcopy(DEFAULTS)
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping at the top level")
        _merge(s, data)
    _merge(s, overrides)
    for key, options in CHOICES.items():
        if s[key] not in options:
            raise SettingsError(f"{key} must be one of {', '.join(options)}, got {s[key]!r}")
    if not isinstance(s["head_screen"], bool):
        raise SettingsError(f"head_screen must be true or false, got {s['head_screen']!r}")
    if int(s["max_batch_size"]) < 1:
        raise SettingsError("max_batch_size must be >= 1")
    if s["kv_cache_dtype"] != "float32" and (s["engine"] != "onnxruntime" or s["graph"] != "auto"):
        raise SettingsError(f"kv_cache_dtype {s['kv_cache_dtype']} is the fused CPU graph's (engine onnxruntime, "
                            f"graph auto), not engine {s['engine']} with graph {s['graph']}")
    g = s["models"]["generator"]
    if not _number(g["stream_interval_ms"], 0):
        raise SettingsError(f"models.generator.stream_interval_ms must be a number >= 0, got {g['stream_interval_ms']!r}")
    if g["stream_responses_per_s"] != "auto" and not _number(g["stream_responses_per_s"], 0):
        raise SettingsError("models.generator.stream_responses_per_s must be 'auto' or a number >= 0 "
                            f"(0: no limit), got {g['stream_responses_per_s']!r}")
    if not _number(g["prefill_wait_ms"], 0):
        raise SettingsError(f"models.generator.prefill_wait_ms must be a number >= 0, got {g['prefill_wait_ms']!r}")
    for flag in ("mix_prefill", "sample_on_device"):
        if not isinstance(g[flag], bool):
            raise SettingsError(f"models.generator.{flag} must be true or false, got {g[flag]!r}")
    if g["pdl"] not in ("auto", True, False):
        raise SettingsError(f"models.generator.pdl must be auto, true or false, got {g['pdl']!r}")
    if g["pdl"] is True and (s["engine"] != "torch" or s["device"] != "cuda"):
        raise SettingsError("models.generator.pdl true is the torch engine's on a CUDA device (programmatic "
                            f"dependent launch of its Triton kernels), not engine {s['engine']} on {s['device']}")
    if g["w8a8"] not in ("auto", False):
        raise SettingsError(f"models.generator.w8a8 must be auto or false, got {g['w8a8']!r}")
    if g["dense_kernel"] not in ("auto", False):
        raise SettingsError(f"models.generator.dense_kernel must be auto or false, got {g['dense_kernel']!r}")
    if not isinstance(g["prefix_reuse"], bool):
        raise SettingsError(f"models.generator.prefix_reuse must be true or false, got {g['prefix_reuse']!r}")
    if not _number(g["mix_tokens"], 0) or g["mix_tokens"] != int(g["mix_tokens"]):
        raise SettingsError(f"models.generator.mix_tokens must be a whole number >= 0, got {g['mix_tokens']!r}")
    if not _number(g["queue_timeout_ms"], 0):
        raise SettingsError(f"models.generator.queue_timeout_ms must be a number >= 0, got {g['queue_timeout_ms']!r}")
    if not _number(g["prefill_chunk"], 0) or g["prefill_chunk"] != int(g["prefill_chunk"]):
        raise SettingsError(f"models.generator.prefill_chunk must be a whole number >= 0 (0: off), got {g['prefill_chunk']!r}")
    if not _number(g["first_token_senders"], 0) or g["first_token_senders"] != int(g["first_token_senders"]):
        raise SettingsError("models.generator.first_token_senders must be a whole number >= 0, "
                            f"got {g['first_token_senders']!r}")
    if not _number(g["gil_switch_ms"], 0.01) or float(g["gil_switch_ms"]) > 100:
        raise SettingsError("models.generator.gil_switch_ms must be a number from 0.01 to 100, "
                            f"got {g['gil_switch_ms']!r}")
    if not _number(g["prefill_token_budget"], 1):
        raise SettingsError(f"models.generator.prefill_token_budget must be >= 1, got {g['prefill_token_budget']!r}")
    e = s["models"]["ensemble"]
    for key, least in (("instances", 1), ("max_queue_size", 1), ("max_prompt_bytes", 0), ("max_words", 0), ("max_word_bytes", 1),
                       ("cancel_poll_ms", 1)):
        if not _number(e[key], least) or e[key] != int(e[key]):
            raise SettingsError(f"models.ensemble.{key} must be a whole number >= {least}, got {e[key]!r}")
    if e["detokenize"] not in ("postprocessing", "generator"):
        raise SettingsError(f"models.ensemble.detokenize must be postprocessing or generator, got {e['detokenize']!r}")
    if e["tokenize"] not in ("preprocessing", "entry"):
        raise SettingsError(f"models.ensemble.tokenize must be preprocessing or entry, got {e['tokenize']!r}")
    if e["generate"] not in ("generator", "entry"):
        raise SettingsError(f"models.ensemble.generate must be generator or entry, got {e['generate']!r}")
    if e["generate"] == "entry":
        # one process holds the engine, and the responses carry their text from it
        if e["detokenize"] != "generator":
            raise SettingsError("models.ensemble.generate: entry sends the text from the engine: it needs "
                                "models.ensemble.detokenize: generator")
        given = [_given(d, "models", "ensemble", "instances") for d in (data, overrides)]
        if any(v is not None and v != 1 for v in given):
            raise SettingsError("models.ensemble.generate: entry runs the engine in the entry model's process: "
                                "models.ensemble.instances must be 1")
        e["instances"] = 1
    if not _number(e["log_requests"], 0) or e["log_requests"] > 1:
        raise SettingsError(f"models.ensemble.log_requests must be a fraction in [0, 1], got {e['log_requests']!r}")
    if s["engine"] == "tensorrt":
        s["device"] = "cuda"  # a TensorRT plan runs on the GPU it was built for
    if s["engine"] == "torch" and s["precision"] not in ("fp32", "fp8", "int8-weight-only"):
        raise SettingsError("the torch engine takes --dtype, and --precision int8-weight-only or fp8 for 8-bit "
                            f"weights (not {s['precision']!r})")
    if s["precision"] == "fp8" and s["engine"] != "torch":
        raise SettingsError("--precision fp8 (FP8 weights) is the torch engine's: add --engine torch")
    if s["engine"] == "torch" and s["precision"] != "fp32" and s["dtype"] == "float32":
        raise SettingsError(f"--precision {s['precision']} widens the weights to bfloat16 or float16 products: "
                            "add --dtype bfloat16 (or float16)")
    return s
