"""Slot bookkeeping shared by the ONNX Runtime and TensorRT engines.

Both keep one KV array per layer and K/V, [slots, kv_heads, max_seq_len, head_dim]; a sequence of
length L occupies positions [0, L) of its slot, and a decode step gathers the batch's slots up to
the longest one and masks each slot's holes.
"""

from __future__ import annotations

import numpy as np


def decode_layout(lengths: np.ndarray, max_seq_len: int) -> tuple[int, np.ndarray]:
    """(Lmax, attention mask [B, Lmax+1]) for one decode step over slots of these lengths:
    ones over each slot's own positions and the new token's column, zeros over the holes."""
    top = int(lengths.max())
    if top + 1 > max_seq_len:
        raise ValueError("a sequence reached the end of its KV cache")
    mask = (np.arange(top + 1)[None, :] < lengths[:, None]).astype(np.int64)
    mask[:, top] = 1
    return top, mask
