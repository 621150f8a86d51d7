"""ONNX Runtime engine for the fused CPU graph (build/ort_graph.py): the KV cache is read and written in place.

The cache is one array per layer and K/V, shaped [slots, kv_heads, max_seq_len, head_dim], bound to the
graph both as the past input and as the present output, so GroupQueryAttention writes each new token's
KV at its row's own length and attends over that length only: no gather, no Concat, no scatter, no
mask. A run covers a contiguous range of rows, so the engine keeps a slot -> row map and swaps two rows'
KV (their valid positions only) to bring the slots of a step into rows [0, n): the running sequences
stay in front, and a swap happens when a sequence leaves from the middle or joins behind a hole.

Prefix reuse works as in engines/ort.py: a released slot keeps its KV (swaps carry it along), and
`prefill_cached` runs only the prompt's tokens after the cached ones on top of it (GroupQueryAttention's
prompt-with-past path, one sequence per run). Its logits and KV are bitwise those of a full prefill
because every prompt run computes an even number of rows: GroupQueryAttention's CPU kernel computes
the last row of a run of 96k + 1 rows on another path whose rounding differs (found by
tests/test_ort_graph.py; 97, 193, 289 on this machine's ONNX Runtime 1.32), so an odd run gets one
filler token after the prompt, treated as a real one whose KV the next decode step overwrites.

A greedy decode step of up to SCREEN_MAX_ROWS rows on a graph with the head's 8-bit copy (fp32 builds)
runs that copy instead of the fp32 head and settles each argmax exactly (head_screen.py).
"""

from __future__ import annotations

import os

import numpy as np

from .base import Ban
from .head_screen import HeadScreen
from .ort import OrtSlots

#: greedy decode steps of at most this many rows run the head's 8-bit copy: the 15M-shaped fp32 model's
#: step on 2 cores took 0.62 / 0.74 / 0.81 / 0.91x the time at 1 / 2 / 3 / 4 rows and 1.01-1.25x at 6-16,
#: where the int8 products cost more than the fp32 head's read saves (docs/benchmarks.md, "The LM head's
#: 8-bit copy")
SCREEN_MAX_ROWS = 4


def _even(rows: int) -> int:
    """The rows a prompt run computes: `rows`, or one more where odd (module docstring)."""
    return rows + rows % 2


class OrtGqaEngine(OrtSlots):
    def __init__(self, model_path: str | os.PathLike, max_slots: int, max_seq_len: int, **kwargs):
        import onnxruntime as ort

        super().__init__(model_path, max_slots, max_seq_len, **kwargs)
        self._ort = ort
        if self.max_seq_len > int(self.spec["max_position_embeddings"]):
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the graph's rotary table "
                             f"({self.spec['max_position_embeddings']} positions)")
        self.row = np.arange(self.max_slots)  # slot -> row of the cache arrays
        self.slot_at = np.arange(self.max_slots)  # row -> slot
        self._logits = np.zeros((self.max_slots, 1, self.vocab_size), dtype=np.float32)  # decode's output
        self.swaps = 0
        self._bindings: dict = {}  # (first row, rows, screened) -> a decode step's binding
        names = {i.name for i in self.session.get_inputs()}
        self._head_rows = "head_rows" in names  # graphs built since the head's 8-bit copy came (older: none)
        self.screen = HeadScreen.from_graph(model_path) if "screen_rows" in names else None
        self._rows = np.arange(self.max_slots, dtype=np.int64)  # bound as row lists: must outlive the bindings
        self._no_rows = np.zeros(0, dtype=np.int64)
        if self.screen is not None:
            hidden = self.screen.head_t.shape[1]
            self._hidden = np.zeros((self.max_slots, 1, hidden), dtype=np.float32)  # a screened step's outputs
            self._screened = np.zeros((self.max_slots, 1, self.vocab_size), dtype=np.float32)
            self._no_logits = np.zeros((0, 1, self.vocab_size), dtype=np.float32)

    # -- rows ---------------------------------------------------------------------------------
    def _swap(self, a: int, b: int) -> None:
        """Exchange rows a and b (their slots' valid KV and the maps)."""
        sa, sb = int(self.slot_at[a]), int(self.slot_at[b])
        n = max(self._valid(sa), self._valid(sb))
        if n:
            for store in self.cache:
                tmp = store[a, :, :n].copy()
                store[a, :, :n] = store[b, :, :n]
                store[b, :, :n] = tmp
        self.slot_at[a], self.slot_at[b] = sb, sa
        self.row[sa], self.row[sb] = b, a
        self.swaps += 1

    def _place(self, slots: np.ndarray, start: int) -> np.ndarray:
        """Move `slots` into rows [start, start + n) (swapping out what is there); their rows."""
        n = len(slots)
        rows = self.row[slots]
        outside = [int(s) for s, r in zip(slots, rows) if not start <= r < start + n]
        if outside:
            wanted = set(int(s) for s in slots)
            free = [r for r in range(start, start + n) if int(self.slot_at[r]) not in wanted]
            for s, r in zip(outside, free):
                self._swap(int(self.row[s]), r)
            rows = self.row[slots]
        return rows

    # -- running the graph --------------------------------------------------------------------
    def _run(self, r0: int, ids: np.ndarray, seqlens: np.ndarray, total: int, index: np.ndarray,
             logits_out: np.ndarray | None = None, screen: bool = False) -> np.ndarray | None:
        """One run over rows [r0, r0 + len(ids)): `ids` [b, s], `seqlens` (total length - 1 per row),
        `index` [b, k]: the positions whose logits come back ([b, k, vocab]). `screen`: through the
        head's 8-bit copy instead (a decode step: `_hidden` and `_screened` hold what comes back)."""
        b = len(ids)
        key = (r0, b, screen)
        bound_once = logits_out is not None or screen  # a decode step's: the same views every time
        io = self._bindings.get(key) if bound_once else None
        if io is None:
            io = self._bind(r0, b, logits_out, screen)
            if bound_once:
                self._bindings[key] = io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens, dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        io.bind_cpu_input("logits_index", np.ascontiguousarray(index, dtype=np.int64))
        self.session.run_with_iobinding(io)
        if screen:
            return None
        return logits_out if logits_out is not None else io.get_outputs()[0].numpy()

    def _bind(self, r0: int, b: int, logits_out: np.ndarray | None, screen: bool = False):
        """A binding of rows [r0, r0 + b) of the cache as past and present, and of the logits (or,
        `screen`, of the hidden states and the 8-bit copy's logits)."""
        ort = self._ort

        def out(name: str, array: np.ndarray | None) -> None:
            if array is None:
                io.bind_output(name)
            else:
                io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

        io = self.session.io_binding()
        # first: get_outputs() lists the outputs in binding order
        out("logits", self._no_logits if screen else logits_out)
        for past, present, store in zip(self.past_names, self.present_names, self.cache):
            value = ort.OrtValue.ortvalue_from_numpy(store[r0:r0 + b])  # a view: shared, not copied
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        if self._head_rows:
            io.bind_cpu_input("head_rows", self._no_rows if screen else self._rows[:b])
            out("hidden", self._hidden[:b] if screen else None)
        if self.screen is not None:
            io.bind_cpu_input("screen_rows", self._rows[:b] if screen else self._no_rows)
            out("screen_logits", self._screened[:b] if screen else None)
        return io

    # -- Engine API ---------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        return self.prefill_batch([slot], [token_ids])[0]

    def prefill_batch(self, slots, prompts) -> np.ndarray:
        """All prompts in one run (right-padded to the longest), behind the running sequences' rows."""
        slots = np.asarray(slots, dtype=np.int64)
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        self._check_prompt(int(slots[0]), int(lens.max()), 0)
        self.lengths[slots] = 0
        # behind the running sequences' rows, where the next decode step wants them
        rows = self._place(slots, int(np.count_nonzero(self.lengths)))
        r0 = int(rows.min())
        pos = rows - r0  # each prompt's row within the run
        width = _even(int(lens.max()))
        # every row runs `width` tokens (the padding after a prompt as real tokens, overwritten by the
        # decode steps that follow): each computes the same even number of rows (module docstring)
        ids = np.zeros((len(slots), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[pos[i], :lens[i]] = p
        lens_run = np.empty_like(lens)
        lens_run[pos] = lens
        logits = self._run(r0, ids, np.full(len(slots), width - 1), width, (lens_run - 1)[:, None])
        self.lengths[slots] = lens
        self.kept[slots] = 0
        return logits[pos, 0].astype(np.float32, copy=False)

    def prefill_cached(self, slots, prompts, cached) -> np.ndarray:
        out = []
        for s, p, c in zip(slots, prompts, cached):
            s, c = int(s), int(c)
            if not c:
                out.append(self.prefill(s, p))
                continue
            n = len(p)
            self._check_prompt(s, n, c)
            new = np.zeros(_even(n - c), dtype=np.int64)  # a filler token after an odd run (module docstring)
            new[:n - c] = p[c:]
            end = c + len(new)
            logits = self._run(int(self.row[s]), new[None], np.array([end - 1]), end, np.array([[n - c - 1]]))
            self.lengths[s], self.kept[s] = n, 0
            out.append(logits[0, 0].astype(np.float32, copy=False))
        return np.stack(out)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self._check_copy(src, dst, n)
        a, b = int(self.row[src]), int(self.row[dst])
        for store in self.cache:
            store[b, :, :n] = store[a, :, :n]
        self.kept[dst] = n

    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self._logits[self._step(slots, tokens), 0]

    def decode_greedy(self, slots: np.ndarray, tokens: np.ndarray, ban: Ban | None = None) -> np.ndarray:
        if self.screen is None or len(slots) > SCREEN_MAX_ROWS:
            return super().decode_greedy(slots, tokens, ban)
        rows = self._step(slots, tokens, screen=True)
        return self.screen.choose(self._hidden[rows, 0], self._screened[rows, 0], ban)

    def _step(self, slots: np.ndarray, tokens: np.ndarray, screen: bool = False) -> np.ndarray:
        """One decode step (`_run`'s `screen`); the rows of its outputs, in the order of `slots`."""
        slots = np.asarray(slots, dtype=np.int64)
        b = len(slots)
        lengths = self.lengths[slots]
        if np.any(lengths == 0) or np.any(lengths + 1 > self.max_seq_len):
            raise ValueError(f"decode over slots {slots.tolist()} of lengths {lengths.tolist()} "
                             f"(each must hold a sequence shorter than {self.max_seq_len})")
        rows = self._place(slots, 0)
        ids = np.empty((b, 1), dtype=np.int64)
        ids[rows, 0] = tokens
        seqlens = np.empty(b, dtype=np.int64)
        seqlens[rows] = lengths
        self._run(0, ids, seqlens, int(lengths.max()) + 1, np.zeros((b, 1), np.int64), self._logits[:b], screen)
        self.lengths[slots] = lengths + 1
        return rows

    def logits_all(self, token_ids) -> np.ndarray:
        """Logits [n, vocab] of every position of `token_ids` run as a fresh sequence (parity and the
        accuracy gate); uses (and then frees) the last slot."""
        slot = self.max_slots - 1
        if self.lengths[slot]:
            raise ValueError("logits_all needs the last slot free")
        ids = np.asarray(token_ids, dtype=np.int64)
        n = len(ids)
        logits = self._run(int(self.row[slot]), ids[None], np.array([n - 1]), n, np.arange(n)[None])
        self.kept[slot] = 0
        return logits[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {**super().describe(), "kv_layout": "gqa"}
