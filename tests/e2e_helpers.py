"""Shared pieces of the end-to-end tests: shared data, repositories, servers, references."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED

STORIES = SHARED / "models" / "stories260K"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: the shared test data (../shared) is not beside this checkout")
    return path


def build_repo(model_dir: Path, out: Path, **overrides) -> Path:
    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings

    settings = load_settings(**{"max_batch_size": 16, **overrides})
    return run_build(str(model_dir), out, settings)


def overload_repo(tmp_path_factory, generate: str = "generator") -> Path:
    """stories260K with one slot and a queue of one in front of the generator and the entry: a
    repository that overloads at once (the overload tests, direct and through the gateway).
    `generate`: where the engine runs (models.ensemble.generate)."""
    need(STORIES)
    return build_repo(STORIES, tmp_path_factory.mktemp("overload") / "repo", max_batch_size=1,
                      models={"generator": {"max_queue_size": 1},
                              "ensemble": {"max_queue_size": 1, "generate": generate}})


def generate_in_entry_repo(tmp_path_factory) -> Path:
    """stories260K with the engine in the entry model's process (`models.ensemble.generate: entry`)."""
    need(STORIES)
    return build_repo(STORIES, tmp_path_factory.mktemp("generate-in-entry") / "repo",
                      models={"ensemble": {"generate": "entry"}})


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(do_sample=False): the reference answer, without end ids."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    gen = GenerationConfig.from_pretrained(str(model_dir))
    eos = gen.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    gen.max_new_tokens, gen.do_sample = max_new_tokens, False
    if gen.pad_token_id is None:
        gen.pad_token_id = eos[0] if eos[0] is not None else 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=gen)
    new = out[0, len(prompt_ids):].tolist()
    eos = set(eos)
    return [t for t in new if t not in eos]


def memorize(model_dir: Path, text: str, steps: int = 80, seed: int = 0, *, bos: bool = False, repeat: int = 3,
             max_ids: int | None = 96, lr: float = 1e-2) -> None:
    """Train the tiny model in `model_dir` to continue `text` (repeated) greedily; save in place.

    Used to make a model that *answers in Chinese and emoji*, so that streaming through byte-level
    and byte-fallback tokens is exercised with real, deterministic outputs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(text * repeat, add_special_tokens=False)["input_ids"][:max_ids]
    # bos: from the start of a sequence, as the server's prompts have it
    batch = torch.tensor([([tok.bos_token_id] if bos else []) + ids])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(model_dir))
