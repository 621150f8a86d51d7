"""The build config file: defaults, overrides, errors, and what lands in each config.pbtxt."""

from __future__ import annotations

import string

import pytest

from tritonchat.build.repository import MODELS, template_dir, template_values
from tritonchat.build.settings import SettingsError, load_settings


def render(settings):
    values = template_values(settings, max_seq_len=256, engine=settings["engine"], model_file="model.onnx")
    return {m: string.Template((template_dir() / m / "config.pbtxt").read_text()).substitute(values) for m in MODELS}


def test_yaml_settings_reach_every_config(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("max_batch_size: 32\nmodels:\n  generator: {max_queue_size: 7}\n"
                   "  preprocessing: {instances: 3, max_queue_delay_microseconds: 1234}\n")
    s = load_settings(cfg, precision="int8")
    assert s["models"]["postprocessing"]["instances"] == 2  # untouched default
    out = render(s)
    assert all("max_batch_size: 32" in text for text in out.values())
    assert 'key: "max_waiting", value: { string_value: "7" }' in out["generator"]
    assert "dynamic_batching {" not in out["generator"]  # it batches continuously itself (see its config)
    assert "count: 3, kind: KIND_CPU" in out["preprocessing"]
    assert "max_queue_delay_microseconds: 1234" in out["preprocessing"]
    assert 'string_value: "int8"' in out["generator"]
    assert 'key: "stream_interval_ms", value: { string_value: "10" }' in out["generator"]  # the defaults
    assert 'key: "stream_responses_per_s", value: { string_value: "auto" }' in out["generator"]
    assert 'key: "prefill_wait_ms", value: { string_value: "0" }' in out["generator"]
    assert 'key: "mix_prefill", value: { string_value: "true" }' in out["generator"]
    assert 'key: "mix_tokens", value: { string_value: "1024" }' in out["generator"]
    assert 'key: "first_token_senders", value: { string_value: "0" }' in out["generator"]
    assert 'key: "gil_switch_ms", value: { string_value: "5" }' in out["generator"]
    assert 'key: "sample_on_device", value: { string_value: "true" }' in out["generator"]
    assert "${" not in "".join(out.values())  # every setting rendered


def test_gpu_engines_get_gpu_instances():
    out = render(load_settings(engine="torch", device="cuda", dtype="bfloat16"))
    assert "kind: KIND_GPU" in out["generator"] and 'string_value: "bfloat16"' in out["generator"]


def test_generate_in_entry_one_instance_and_no_gpu_for_the_generator_model(tmp_path):
    # the entry runs the engine: one instance (one process holds it), the generator model's process
    # holds no engine and so no GPU; both configs say where the engine runs
    out = render(load_settings(engine="torch", device="cuda", dtype="bfloat16",
                               models={"ensemble": {"generate": "entry"}}))
    assert "count: 1, kind: KIND_CPU" in out["ensemble"] and "kind: KIND_CPU" in out["generator"]
    for model in ("ensemble", "generator"):
        assert 'key: "generate", value: { string_value: "entry" }' in out[model]
    # the entry's line holds every slot and the generator's waiting line (16 + 256), in its one instance
    assert 'key: "max_in_flight", value: { string_value: "272" }' in out["ensemble"]
    cfg = tmp_path / "build.yaml"
    cfg.write_text("models:\n  ensemble: {generate: entry, instances: 1}\n")
    assert load_settings(cfg)["models"]["ensemble"]["instances"] == 1
    default = render(load_settings())
    assert 'key: "generate", value: { string_value: "generator" }' in default["ensemble"]
    assert "count: 2, kind: KIND_CPU" in default["ensemble"]


@pytest.mark.parametrize("bad, message", [
    ({"models": {"ensemble": {"generate": "client"}}},
     r"models.ensemble.generate must be generator or entry, got 'client'"),
    ({"models": {"ensemble": {"generate": "entry", "instances": 2}}},
     r"generate: entry runs the engine in the entry model's process: models.ensemble.instances must be 1"),
    ({"models": {"ensemble": {"generate": "entry", "detokenize": "postprocessing"}}},
     r"generate: entry sends the text from the engine: it needs models.ensemble.detokenize: generator"),
    ({"precision": "int4"}, "precision must be one of"),
    ({"engine": "vllm"}, "engine must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"models": {"generator": {"stream_interval_ms": -5}}}, r"stream_interval_ms must be a number >= 0, got -5"),
    ({"models": {"generator": {"stream_responses_per_s": "fast"}}}, r"stream_responses_per_s must be 'auto' or a number"),
    ({"models": {"generator": {"prefill_token_budget": 0}}}, r"prefill_token_budget must be >= 1, got 0"),
    ({"models": {"generator": {"prefill_wait_ms": "soon"}}}, r"prefill_wait_ms must be a number >= 0, got 'soon'"),
    ({"models": {"generator": {"mix_prefill": "yes"}}}, r"mix_prefill must be true or false, got 'yes'"),
    ({"models": {"generator": {"sample_on_device": 1}}}, r"sample_on_device must be true or false, got 1"),
    ({"models": {"generator": {"mix_tokens": 1.5}}}, r"mix_tokens must be a whole number >= 0, got 1.5"),
    ({"models": {"generator": {"pdl": "yes"}}}, r"models.generator.pdl must be auto, true or false, got 'yes'"),
    ({"models": {"generator": {"pdl": True}}}, r"pdl true is the torch engine's on a CUDA device"),
    ({"models": {"generator": {"w8a8": True}}}, r"models.generator.w8a8 must be auto or false, got True"),
    ({"models": {"generator": {"dense_kernel": "yes"}}}, r"dense_kernel must be auto or false, got 'yes'"),
    ({"models": {"generator": {"first_token_senders": -1}}}, r"first_token_senders must be a whole number >= 0, got -1"),
    ({"models": {"generator": {"first_token_senders": "auto"}}}, r"first_token_senders must be a whole number"),
    ({"models": {"generator": {"gil_switch_ms": 0}}}, r"gil_switch_ms must be a number from 0.01 to 100, got 0"),
    ({"kv_cache_dtype": "float16", "graph": "export"}, r"kv_cache_dtype float16 is the fused CPU graph's"),
    ({"kv_cache_dtype": "int8"}, r"kv_cache_dtype must be one of"),
    ({"head_screen": "yes"}, r"head_screen must be true or false, got 'yes'"),
    ({"models": {"ensemble": {"detokenize": "inline"}}},
     r"models.ensemble.detokenize must be postprocessing or generator, got 'inline'"),
    ({"models": {"ensemble": {"tokenize": "client"}}},
     r"models.ensemble.tokenize must be preprocessing or entry, got 'client'"),
])
def test_bad_values_are_refused(bad, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(**bad)


@pytest.mark.parametrize("key, value, why", [
    ("max_queue_delay_microseconds", 100, "the generator has no Triton dynamic batcher"),
    ("chain_at", 0.75, "choosing the next decode step later in the running one gave no steady gain"),
])
def test_retired_generator_settings_say_why(tmp_path, key, value, why):
    cfg = tmp_path / "build.yaml"
    cfg.write_text(f"models:\n  generator: {{{key}: {value}}}\n")
    with pytest.raises(SettingsError, match=f"'models.generator.{key}' was removed: {why}"):
        load_settings(cfg)


def test_unknown_keys_are_refused(tmp_path):
    cfg = tmp_path / "build.yaml"
    cfg.write_text("models:\n  generator: {instance: 2}\n")
    with pytest.raises(SettingsError, match="unknown build setting 'models.generator.instance'"):
        load_settings(cfg)
