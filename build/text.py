"""Text helpers shared by INT8 calibration and the accuracy gate: the built-in sample text and encoding
without special tokens."""

from __future__ import annotations

from pathlib import Path


def builtin_sample(part: str = "calibration") -> str:
    """The text shipped in `calibration_sample.txt`: part 'calibration' (everything above the
    `# held-out` line, used to calibrate INT8) or 'heldout' (below it, a default evaluation text)."""
    text = read_package_text("calibration_sample.txt")
    calib, _, heldout = text.partition("\n# held-out\n")
    if part == "calibration":
        return calib.strip() + "\n"
    if part == "heldout":
        return heldout.strip() + "\n"
    raise ValueError(part)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (HF tokenizers or a `tokenizers.Tokenizer`)."""
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(getattr(enc, "ids", enc))


def bos_id(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def read_package_text(name: str) -> str:
    try:
        from importlib.resources import files

        return (files(__package__) / name).read_text(encoding="utf-8") if __package__ else \
            (Path(__file__).parent / name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        return (Path(__file__).parent / name).read_text(encoding="utf-8")
