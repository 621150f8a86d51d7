"""The fused CPU graph (build/ort_graph.py) and its engine (python_backend/engines/ort_gqa.py), on
seeded tiny Llamas (head_dim 16, grouped KV heads): logits against transformers, greedy answers against
`generate` with staggered joins, decode over any subset of slots in any order (rows swapped in place),
prefix reuse bitwise exact for every prompt length, INT8 weights and embedding within the gate at under
0.30x the FP32 artifact, the build choosing the graph (and saying why not), stories260K's 8-wide heads
padded to 16, and a fused repository through the real tritonserver."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import need_shared


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from tritonchat.build.export import load_model
    from tritonchat.build.synthetic import make_random_model

    need_shared("tokenizers")
    out = make_random_model("llama", tmp_path_factory.mktemp("gqa") / "hf", tokenizer="llama2", seed=3, layers=2,
                            hidden=64, heads=4, kv_heads=2, intermediate=160, max_positions=512,
                            tie_embeddings=False)
    return out, load_model(str(out))


@pytest.fixture(scope="module")
def fused(hf_model, tmp_path_factory):
    """{precision: model.onnx}: the fused graph in fp32 (with the head's 8-bit copy; `fp32-plain`
    without, as INT8 builds start from) and int8-weight-only, and with a float16 KV cache."""
    from tritonchat.build import ort_graph
    from tritonchat.build.export import write_spec
    from tritonchat.build.quantize import quantize

    _, model = hf_model
    root = tmp_path_factory.mktemp("fused")
    fp32 = root / "fp32" / "model.onnx"
    spec = ort_graph.write_graph(model, fp32)
    write_spec(spec, fp32.parent / "kv_spec.json", kv_layout=ort_graph.LAYOUT)
    plain = root / "plain" / "model.onnx"  # as the build: an INT8 graph's head is 8-bit, it gets no copy
    write_spec(ort_graph.write_graph(model, plain, head_screen=False), plain.parent / "kv_spec.json",
               kv_layout=ort_graph.LAYOUT)
    int8 = quantize(plain, root / "int8" / "model.onnx", "int8-weight-only", spec=spec)
    kv16 = root / "kv16" / "model.onnx"
    write_spec(ort_graph.write_graph(model, kv16, kv_dtype="float16"), kv16.parent / "kv_spec.json",
               kv_layout=ort_graph.LAYOUT)
    return {"fp32": fp32, "fp32-plain": plain, "int8-weight-only": int8, "kv-float16": kv16}


def _engine(path, slots=6, seq=512, threads=1):
    from tritonchat.python_backend.engines import open_ort_engine
    from tritonchat.python_backend.engines.ort_gqa import OrtGqaEngine

    ex = open_ort_engine(path, max_slots=slots, max_seq_len=seq, threads=threads)
    assert isinstance(ex, OrtGqaEngine)
    return ex


def test_logits_and_greedy_answers_match_transformers(hf_model, fused):
    """Every prompt position, prefills into non-adjacent slots, batched decode steps; then greedy
    answers with 2 slots for 4 prompts (later prompts join while others decode, rows are swapped)."""
    from tritonchat.build.parity import check_greedy, check_parity

    _, model = hf_model
    prompts = [[1, 450, 4996, 17354, 1701], [1, 15043], [1] + list(range(300, 340)), [1, 9038, 2501, 263, 931]]
    report = check_parity(model, fused["fp32"], prompts=prompts, tolerance=1e-4, decode_steps=3)
    assert report.ok and report.max_abs_diff < 1e-4
    res = check_greedy(model, fused["fp32"], prompts=prompts, max_new_tokens=12, max_slots=2, join_every=3, eos_ids=[])
    assert res.ok, res.mismatches()


def test_decode_over_any_subset_of_slots_in_any_order(fused):
    """Sequences start, leave and decode in random subsets and orders; each step's logits are those of
    the whole sequence run fresh (rows are swapped to bring a step's slots together: it happened)."""
    ex = _engine(fused["fp32"])
    probe = _engine(fused["fp32"], slots=1)  # each sequence's logits run fresh
    rng = np.random.default_rng(0)
    seqs: dict[int, list[int]] = {}
    for step in range(60):
        free = [s for s in range(ex.max_slots) if s not in seqs]
        if free and (len(seqs) < 2 or rng.random() < 0.3):
            s = int(rng.choice(free))
            seqs[s] = [int(t) for t in rng.integers(3, ex.vocab_size, int(rng.integers(2, 20)))]
            ex.prefill(s, np.array(seqs[s]))
        if len(seqs) > 2 and rng.random() < 0.2:
            s = int(rng.choice(list(seqs)))
            ex.release(s)
            del seqs[s]
        chosen = rng.permutation(list(seqs))[:int(rng.integers(1, len(seqs) + 1))]
        tokens = rng.integers(3, ex.vocab_size, len(chosen))
        got = ex.decode(np.array(chosen), tokens)
        for s, t, row in zip(chosen, tokens, got):
            seqs[int(s)].append(int(t))
            want = probe.logits_all(seqs[int(s)])[-1]
            assert np.allclose(row, want, atol=1e-4), f"step {step}, slot {s}: {np.abs(row - want).max()}"
    assert ex.swaps > 0


@pytest.mark.parametrize("precision", ["fp32", "int8-weight-only", "kv-float16"])
def test_a_prefill_on_a_cached_prefix_is_bitwise_a_full_prefill_for_every_length(fused, precision):
    """Prompts of every length from 4 to 299 tokens, prefixes of 1, 2, half and all but 2: the logits
    and KV of a prefill on the cached prefix are bitwise those of a full prefill (an odd run gets a
    filler token: engines/ort_gqa.py; without it 97, 193 and 289 differed)."""
    ex = _engine(fused[precision])
    rng = np.random.default_rng(6)
    for n in range(4, 300):
        ids = rng.integers(3, ex.vocab_size, n)
        full = ex.prefill(0, ids).copy()
        for c in sorted({1, 2, n // 2, n - 2}):
            ex.prefill(1, ids[:c] if c % 2 else ids[:c + 1])  # a prefix left by a longer prompt, too
            ex.release(1)
            got = ex.prefill_cached([1], [ids], [c])[0]
            assert np.array_equal(got, full), f"n {n}, cached {c}: {np.abs(got - full).max()}"
            for store in ex.cache:
                assert np.array_equal(store[ex.row[1], :, :n], store[ex.row[0], :, :n]), f"n {n}, cached {c}: KV"
            ex.release(1)
        ex.release(0)
    ex.prefill(0, ids)
    ex.release(0)
    with pytest.raises(ValueError, match="at least 2 must be computed"):
        ex.prefill_cached([0], [ids], [len(ids) - 1])


def test_a_float16_kv_cache_halves_the_cache_and_passes_the_gate(hf_model, fused):
    """kv_cache_dtype float16: the engine's cache in float16 (half the bytes), logits close to the
    float32 graph's, the same greedy answers as transformers, the fp16 gate passed; a build writes it
    and records it, and refuses it where the fused graph is not used."""
    from transformers import AutoTokenizer

    from tritonchat.build.evaluate import evaluate, gate
    from tritonchat.build.parity import check_greedy, check_parity
    from tritonchat.build.settings import SettingsError, load_settings

    src, model = hf_model
    half, full = _engine(fused["kv-float16"]), _engine(fused["fp32"])
    assert all(c.dtype == np.float16 for c in half.cache) and all(c.dtype == np.float32 for c in full.cache)
    assert sum(c.nbytes for c in half.cache) * 2 == sum(c.nbytes for c in full.cache)
    prompts = [[1, 450, 4996, 17354, 1701], [1] + list(range(300, 340))]
    report = check_parity(model, fused["kv-float16"], prompts=prompts, tolerance=2e-2, decode_steps=3)
    assert report.ok and report.max_abs_diff > 0, report.max_abs_diff  # not the float32 graph by mistake
    assert check_greedy(model, fused["kv-float16"], prompts=prompts, max_new_tokens=12, max_slots=2,
                        join_every=3, eos_ids=[]).ok
    ev = evaluate(model, fused["kv-float16"], prompts=["Once upon a time", "The little dog"], new_tokens=16,
                  tokenizer=AutoTokenizer.from_pretrained(str(src)), precision="fp16")
    gate(ev, "fp16")
    with pytest.raises(SettingsError, match="fused CPU graph"):
        load_settings(None, kv_cache_dtype="float16", graph="export")
    with pytest.raises(SettingsError, match="fused CPU graph"):
        load_settings(None, kv_cache_dtype="float16", engine="torch", device="cuda", dtype="bfloat16")


def test_a_float16_kv_cache_build(hf_model, tmp_path):
    import onnx
    from rich.console import Console

    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings

    src, _ = hf_model
    con = Console(record=True, width=200)
    repo = run_build(str(src), tmp_path / "kv16", load_settings(None, max_seq_len=256, kv_cache_dtype="float16"),
                     progress_console=con)
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["kv_cache_dtype"] == "float16" and manifest["graph"] == "fused" and "accuracy" in manifest
    g = onnx.load(str(repo / "generator" / "1" / "model.onnx"), load_external_data=False)
    past = [i for i in g.graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in past)
    assert "Accuracy gate (float16 KV cache)" in con.export_text()


def test_int8_weights_and_embedding_pass_the_gate_at_under_030x(hf_model, fused):
    from tritonchat.build.evaluate import evaluate, gate
    from tritonchat.build.onnx_files import artifact_size

    import onnx

    from transformers import AutoTokenizer

    src, model = hf_model
    g = onnx.load(str(fused["int8-weight-only"]), load_external_data=False)
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # q|k|v, o, gate|up, down per layer; the head
    floats = {t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert "model.embed_tokens.weight" not in floats and "model.embed_tokens.weight_int8" in {
        t.name for t in g.graph.initializer}
    # against the FP32 weights alone: an fp32 build's graph also carries the head's 8-bit copy
    ratio = artifact_size(fused["int8-weight-only"]) / artifact_size(fused["fp32-plain"])
    assert ratio <= 0.30, ratio
    report = evaluate(model, fused["int8-weight-only"], prompts=["Once upon a time", "The little dog"], new_tokens=16,
                      tokenizer=AutoTokenizer.from_pretrained(str(src)))
    gate(report, "int8-weight-only")  # raises when out of bounds
    assert report.size_ratio <= 0.30


def test_the_build_chooses_the_graph_and_says_why_not(hf_model, tmp_path):
    from rich.console import Console

    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings
    from tritonchat.build.synthetic import make_random_model

    src, _ = hf_model
    con = Console(record=True, width=200)
    run_build(str(src), tmp_path / "fused", load_settings(None, max_seq_len=256), progress_console=con)
    spec = json.loads((tmp_path / "fused" / "generator" / "1" / "kv_spec.json").read_text())
    assert spec["kv_layout"] == "gqa"
    assert json.loads((tmp_path / "fused" / "manifest.json").read_text())["graph"] == "fused"
    run_build(str(src), tmp_path / "export", load_settings(None, max_seq_len=256, graph="export"), progress_console=con)
    assert "kv_layout" not in json.loads((tmp_path / "export" / "generator" / "1" / "kv_spec.json").read_text())
    gpt2 = make_random_model("gpt2", tmp_path / "gpt2", tokenizer="gpt2", layers=1, hidden=32, heads=4,
                             max_positions=256)
    run_build(str(gpt2), tmp_path / "gpt2-repo", load_settings(None), progress_console=con)
    assert "kv_layout" not in json.loads((tmp_path / "gpt2-repo" / "generator" / "1" / "kv_spec.json").read_text())
    assert "the fused graph cannot express this model: architecture 'gpt2'" in con.export_text()


def test_stories260k_heads_padded_to_16_keep_its_logits_and_answers(tmp_path):
    """stories260K's heads are 8 wide; the fused graph pads them to 16 (zeros, rotary pairs kept,
    o_proj to match): logits within 1e-4 of transformers at every position and decode step, greedy
    answers identical, and the KV cache 16 wide."""
    from e2e_helpers import STORIES, need
    from tritonchat.build import ort_graph
    from tritonchat.build.export import load_model, write_spec
    from tritonchat.build.parity import check_greedy, check_parity

    need(STORIES)
    model = load_model(str(STORIES))
    out = tmp_path / "model.onnx"
    spec = ort_graph.write_graph(model, out)
    assert spec.head_dim == 16 and model.config.head_dim == 8
    write_spec(spec, tmp_path / "kv_spec.json", kv_layout=ort_graph.LAYOUT)
    prompts = ["Once upon a time", "The little dog", "One day, a girl named Lily went to the park with her mom."]
    report = check_parity(model, out, tokenizer=str(STORIES), prompts=prompts, tolerance=1e-4, decode_steps=3)
    assert report.ok
    res = check_greedy(model, out, tokenizer=str(STORIES), prompts=prompts, max_new_tokens=40, max_slots=2)
    assert res.ok, res.mismatches()
    assert _engine(out, slots=2).cache[0].shape == (2, 4, 512, 16)


@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_a_fused_repository_through_the_real_server(hf_model, tmp_path, kv):
    """Built by `tritonchat build` (the fused graph chosen, with the LM head's 8-bit copy; its KV cache in
    float32 or float16), served by tritonserver: greedy answers of concurrent requests equal transformers' (rows swapped as
    requests come and go), streamed text equals the whole answer, a bad request is refused and the
    server keeps serving."""
    import concurrent.futures

    from transformers import AutoTokenizer

    from e2e_helpers import build_repo, hf_greedy
    from tritonchat.client import ChatClient, InvalidRequest
    from tritonchat.server import TritonServer

    src, _ = hf_model
    repo = build_repo(src, tmp_path / "repo", max_batch_size=4, max_seq_len=256, kv_cache_dtype=kv)
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["graph"] == "fused" and manifest.get("kv_cache_dtype", "float32") == kv
    assert manifest["head_screen"] is True  # greedy steps of up to 4 rows run the head's 8-bit copy
    tok = AutoTokenizer.from_pretrained(str(src))
    prompts = ["Once upon a time", "The little dog ran", "Hello", "A long time ago in a land far away",
               "She said", "It was a dark and stormy night",
               "Once upon a time " * 30]  # over prefill_chunk (128 tokens): prefilled in pieces
    refs = {p: hf_greedy(src, tok(p)["input_ids"], 24 + 4 * i) for i, p in enumerate(prompts)}
    with TritonServer(repo) as srv, ChatClient(srv.grpc_url) as client:
        def ask(i):
            return client.generate(prompts[i], max_tokens=24 + 4 * i, min_tokens=24 + 4 * i)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(ask, range(len(prompts))))
        for p, out in zip(prompts, outs):
            assert out.output_ids == refs[p], p
        with pytest.raises(InvalidRequest, match="max_tokens"):
            client.generate("Hello", max_tokens=-3)
        out = client.generate(prompts[0], max_tokens=24, min_tokens=24)
        assert out.output_ids == refs[prompts[0]]
        assert "".join(d.text for d in client.stream(prompts[0], max_tokens=24, min_tokens=24)) == out.text


def test_default_threads_follow_the_model_size(monkeypatch):
    """threads 0: one thread for a model under 8 MiB of weights (stories260K), else every usable CPU up to
    4 and half of them beyond (the measurements: docs/benchmarks.md, "The CPU engine's own graph"; usable:
    a cgroup's quota counts, tests/test_cpus.py)."""
    from tritonchat.python_backend.engines import ort
    from tritonchat.python_backend.engines.ort import PARALLEL_MIN_WEIGHT_BYTES, default_threads

    for cores, small, large in ((2, 1, 2), (4, 1, 4), (16, 1, 8), (1, 1, 1)):
        monkeypatch.setattr(ort, "usable_cpus", lambda c=cores: c)
        assert default_threads(PARALLEL_MIN_WEIGHT_BYTES - 1) == small
        assert default_threads(PARALLEL_MIN_WEIGHT_BYTES) == large
