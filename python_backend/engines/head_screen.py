"""Greedy decode steps through an 8-bit copy of the LM head, with the fp32 model's answer.

A small model's float32 LM head is most of what a decode step reads (the stories15M-shaped Llama: 37 of
61 MB), and at one stream on a CPU the step is a memory read. For a greedy row only the argmax matters,
so the fused graph (build/ort_graph.py) also carries an 8-bit copy of the head (MatMulNBits, one scale
per block of 32, ONNX Runtime's int8 kernel: 10 MB) that a decode step of few rows runs instead, and
the argmax is then settled exactly:

    |screen_j - logit_j| <= ||h|| * E + ||h - h_q|| * Q + slack       for every token j

where h is the row's final hidden state, E = max_j ||w_j - q_j|| (the weights' rounding, w_j the fp32
row of token j, q_j its 8-bit copy), ||h - h_q|| the activations' rounding (the kernel quantizes h to
int8, at most max|h| / 254 per value whatever its block), Q = max_j ||q_j||, and the slack covers float
rounding, the fp32 head's included, a hundred times over. Every token whose screened logit is within
twice that bound of the best one is a candidate; the candidates' logits are recomputed in float64 from
the fp32 head, and the best wins (the lowest id among equals, as argmax). The answer is the argmax of
the fp32 head's exact logits; where the fp32 graph's own rounding could tie two tokens, both are
candidates and float64 decides. tests/test_head_screen.py holds the bound against real decode steps.
Candidates number ~10 a row on a seeded random model (flat logits), fewer on a trained one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import NONFINITE, Ban, greedy_tokens

#: the graph's names (build/ort_graph.py)
HEAD, SCREEN_Q, SCREEN_SCALES = "lm_head.weight", "lm_head.screen_q8", "lm_head.screen_scales"
#: the float-rounding share of the bound, relative to ||h|| * max(Q, max_j ||w_j||): ~1e-6 expected
SLACK = 1e-4
#: vocabulary rows measured at a time at load (float64 temporaries of a 32k x 2k head would be ~0.5 GB)
LOAD_ROWS = 4096


class HeadScreen:
    def __init__(self, head_t: np.ndarray, q8: np.ndarray, scales: np.ndarray):
        """`head_t`: the fp32 head [vocab, hidden]; `q8`: its 8-bit copy as MatMulNBits stores it
        ([vocab, blocks, block] uint8, zero point 128); `scales`: [vocab, blocks]."""
        vocab, hidden = head_t.shape
        self.head_t = np.ascontiguousarray(head_t, dtype=np.float32)
        error = copy = weight = 0.0  # the largest squared row norms of w - q, q and w
        for r in range(0, vocab, LOAD_ROWS):
            w = self.head_t[r:r + LOAD_ROWS].astype(np.float64)
            q = ((q8[r:r + LOAD_ROWS].astype(np.float64) - 128.0) * scales[r:r + LOAD_ROWS, :, None])
            q = q.reshape(len(w), -1)[:, :hidden]
            error = max(error, float(np.einsum("ij,ij->i", w - q, w - q).max()))
            copy = max(copy, float(np.einsum("ij,ij->i", q, q).max()))
            weight = max(weight, float(np.einsum("ij,ij->i", w, w).max()))
        self.weight_error, self.copy_norm = float(np.sqrt(error)), float(np.sqrt(copy))
        self.norm = max(self.copy_norm, float(np.sqrt(weight)))
        self.candidates = 0  # recomputed logits and the rows they were for (tests/test_head_screen.py)
        self.rows = 0

    @classmethod
    def from_graph(cls, model_path: str | Path) -> "HeadScreen":
        """Read the fp32 head and its 8-bit copy from the graph's initializers (only those three)."""
        import onnx

        model_path = Path(model_path)
        graph = onnx.load(str(model_path), load_external_data=False).graph
        found = {t.name: t for t in graph.initializer if t.name in (HEAD, SCREEN_Q, SCREEN_SCALES)}
        missing = {HEAD, SCREEN_Q, SCREEN_SCALES} - set(found)
        if missing:
            raise ValueError(f"{model_path} has no head screen: {', '.join(sorted(missing))} missing")
        arrays = {name: _read(tensor, model_path.parent) for name, tensor in found.items()}
        return cls(arrays[HEAD].T, arrays[SCREEN_Q], arrays[SCREEN_SCALES])

    def bound(self, hidden: np.ndarray) -> np.ndarray:
        """Per row of `hidden` [b, H]: the largest |screen_j - logit_j| over tokens j (module docstring)."""
        h = hidden.astype(np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", h, h))
        rounding = np.sqrt(h.shape[1]) * np.abs(h).max(1) / 254.0 * 1.01
        return norm * self.weight_error + rounding * self.copy_norm + SLACK * norm * self.norm + 1e-6

    def choose(self, hidden: np.ndarray, screen: np.ndarray, ban: Ban | None = None) -> np.ndarray:
        """The greedy tokens of rows with final hidden states `hidden` [b, H] and screened logits
        `screen` [b, V] (changed in place by `ban`); NONFINITE for a row whose logits are not finite."""
        if ban is not None:
            screen[np.ix_(ban.rows, ban.ids)] = -np.inf
        top = screen.max(1)
        ok = np.isfinite(top) & np.isfinite(hidden).all(1)
        out = np.full(len(hidden), NONFINITE, dtype=np.int64)
        if not ok.all():  # NaN or inf somewhere: that row's full fp32 logits decide, as without the screen
            for i in np.flatnonzero(~ok):
                logits = self.head_t @ hidden[i]
                row_ban = None if ban is None or i not in ban.rows else Ban(np.array([0]), ban.ids)
                out[i] = greedy_tokens(logits[None], row_ban)[0]
        rows = np.flatnonzero(ok)
        if not len(rows):
            return out
        h, s = hidden[rows], screen[rows]
        floor = top[rows] - 2.0 * self.bound(h)
        r, c = np.nonzero(s >= floor[:, None])
        exact = np.einsum("ij,ij->i", h[r].astype(np.float64), self.head_t[c].astype(np.float64))
        # per row the best exact logit, the lowest id among equals (np.nonzero lists ids in order, lexsort is stable)
        order = np.lexsort((-exact, r))
        first = np.ones(len(order), dtype=bool)
        first[1:] = r[order][1:] != r[order][:-1]
        out[rows[r[order][first]]] = c[order][first]
        self.candidates += len(c)
        self.rows += len(rows)
        return out


def _read(tensor, folder: Path) -> np.ndarray:
    """An initializer's array, its bytes read from the graph's data file where they are stored there.
    Not onnx's own loader: it refuses a data file with several hard links, and `tritonchat deploy`
    stages a version's files as hard links (ONNX Runtime reads them as it reads any file)."""
    from onnx import external_data_helper, helper, numpy_helper

    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    path = (folder / info["location"]).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"initializer {tensor.name}: its data file {info['location']!r} is outside {folder}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape))
    data = np.fromfile(path, dtype=dtype.newbyteorder("<"), count=count, offset=int(info.get("offset", 0)))
    if data.size != count:
        raise ValueError(f"initializer {tensor.name}: {path.name} ends before its {count} values")
    return data.astype(dtype, copy=False).reshape(shape)
