"""Prompts of an exact token length, cut from real text with the repository's own tokenizer.

The server counts a prompt as ``len(tokenizer(text, add_special_tokens=True))`` (the preprocessing
model; docs/contract.md), so a prompt "of N tokens" here is one whose encoding *with* the special
tokens (BOS) is N ids long: the ``num_input_tokens`` the server reports back.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

FALLBACK_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
                 "with her friends. One day, she saw a big red ball under a tree and ran to get it. ")


def sample_text_path() -> Optional[Path]:
    """``shared/data/tinystories_sample.txt`` ($TRITONCHAT_SHARED, ../shared beside the checkout, or
    ../shared beside the working directory)."""
    from tritonchat.build.synthetic import shared_dir

    for root in (shared_dir(), Path.cwd().parent / "shared"):
        cand = root / "data" / "tinystories_sample.txt"
        if cand.is_file():
            return cand
    return None


def source_text(min_chars: int = 4000) -> str:
    path = sample_text_path()
    text = path.read_text(encoding="utf-8", errors="replace") if path else FALLBACK_TEXT
    text = " ".join(text.split())  # one line: no blank-line tokens
    while len(text) < min_chars:
        text = text + " " + text
    return text


def tokenizer_dir_for(repo: Optional[Path]) -> Optional[Path]:
    if repo is None:
        return None
    cand = Path(repo) / "preprocessing" / "1" / "tokenizer"
    return cand if cand.is_dir() else None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 10 ** 9  # long source text is cut here, not by the tokenizer (and no warning)
    return tok


def server_length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def special_count(tokenizer) -> int:
    return server_length(tokenizer, "a") - len(tokenizer("a", add_special_tokens=False)["input_ids"])


def exact_prompt(tokenizer, ids: List[int], n_tokens: int) -> Optional[str]:
    """Text whose server-side length is exactly ``n_tokens``, decoded from a prefix of ``ids``."""
    specials = special_count(tokenizer)
    if n_tokens <= specials:
        raise ValueError(f"a prompt needs at least {specials + 1} tokens with this tokenizer "
                         f"({specials} special token(s) + text)")
    k = max(1, n_tokens - specials)
    for _ in range(16):  # decode/re-encode is not always a round trip: nudge the prefix length
        text = tokenizer.decode(ids[:k], skip_special_tokens=True).strip()
        if not text:
            k += 1
            continue
        have = server_length(tokenizer, text)
        if have == n_tokens:
            return text
        k += n_tokens - have
        if k < 1 or k > len(ids):
            return None
    return None


def build_prompts(tokenizer, n_tokens: int, count: int = 16, text: Optional[str] = None) -> List[str]:
    """``count`` different prompts of exactly ``n_tokens`` tokens each (distinct offsets into the text)."""
    if n_tokens <= special_count(tokenizer):
        raise ValueError(f"prompt length must be > {special_count(tokenizer)} (the tokenizer's special tokens)")
    text = text or source_text(min_chars=40 * (n_tokens + 64))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < 2 * n_tokens + 64:
        text = text + " " + text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = text.split(" ")
    prompts: List[str] = []
    starts = range(0, len(words), max(1, len(words) // max(1, count * 2)))
    for start in starts:
        chunk = " ".join(words[start:]) + " " + " ".join(words[:start])
        chunk_ids = tokenizer(chunk, add_special_tokens=False)["input_ids"][: n_tokens + 32]
        p = exact_prompt(tokenizer, chunk_ids, n_tokens)
        if p is not None and p not in prompts:
            prompts.append(p)
        if len(prompts) >= count:
            break
    if not prompts:
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens with this tokenizer")
    while len(prompts) < count:
        prompts.append(prompts[len(prompts) % max(1, len(prompts))])
    return prompts


def approximate_prompts(n_tokens: int, count: int = 16) -> List[str]:
    """Without a tokenizer: about one token per word (the real count is read back from the server)."""
    words = source_text().split(" ")
    out = []
    for i in range(count):
        start = (i * 37) % max(1, len(words) - n_tokens)
        out.append(" ".join(words[start:start + max(1, n_tokens - 1)]))
    return out
