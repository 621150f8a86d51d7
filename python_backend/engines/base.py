"""The engine interface the generator's scheduler drives.

An engine owns the model and the KV cache of `max_slots` sequences. A sequence lives in one
slot from its prefill until `release`; the scheduler never copies KV data, it only names slots.
Every call returns float32 logits on the host as a numpy array (the sampler's input).

Prefix reuse (`can_reuse_prefix`): a released slot keeps its KV until the next prefill into it, and
`prefill_cached` computes only the prompt tokens past a prefix whose KV the slot still holds (the
scheduler remembers which tokens that is: batching/prefix.py).

Implementations: `engines.ort.OrtEngine` (ONNX Runtime, CPU: the embedded default),
`engines.torch.TorchEngine` (PyTorch, CUDA graphs) and `engines.trt.TrtEngine` (TensorRT plan);
`engines.create_engine` builds the one a repository names.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Ban:
    """Token ids (`ids`) masked out of the rows `rows` (indices into the step's batch) before argmax."""

    rows: np.ndarray
    ids: np.ndarray


#: the token a greedy step returns for a row whose logits were not finite (NaN or inf): that
#: request fails alone (batching/scheduler.py), the other rows of the step go on
NONFINITE = -1


def greedy_tokens(logits: np.ndarray, ban: Ban | None = None) -> np.ndarray:
    """The argmax of each row of host logits (after `ban`), NONFINITE where the chosen logit is NaN
    or inf: argmax picks a NaN or +inf where the row holds one, and -inf only where every logit is."""
    if ban is not None:
        logits[np.ix_(ban.rows, ban.ids)] = -np.inf
    best = logits.argmax(axis=-1)
    bad = ~np.isfinite(logits[np.arange(len(best)), best])
    if bad.any():
        best[bad] = NONFINITE
    return best


@dataclasses.dataclass(frozen=True)
class Draws:
    """Rows of a step whose token the engine chooses from their own distribution rather than as the
    plain argmax (indices into the step's rows: decode rows, then the prompts it carries), each with
    its temperature (0: the argmax, after its penalties), `top_k` (0: off), `top_p` (1: off) and the
    uniform number in [0, 1) its request's random generator gave for this token (0 where greedy;
    `draw_tokens` says what is drawn). `penalties`, where some row has one: [3, rows] float64, each
    row's repetition, presence and frequency penalty (1, 0, 0: none), applied first (`penalize`) with
    the counts of the tokens its slot's sequence holds (`Engine.track`)."""

    rows: np.ndarray  # int64
    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int64
    top_p: np.ndarray  # float32
    u: np.ndarray  # float64
    penalties: np.ndarray | None = None  # float64 [3, rows]: repetition, presence, frequency

    @property
    def ordered(self) -> bool:
        """Does some drawn row (temperature > 0) keep only its top_k or top_p tokens? Only such rows need
        the logits in order (a device sorts them); the others draw over every token in id order."""
        drawn = self.temperature > 0
        return bool(((self.top_k[drawn] > 0) | (self.top_p[drawn] < 1)).any())


def penalize(row: np.ndarray, seen: np.ndarray, counts: np.ndarray, repetition: float, presence: float,
             frequency: float) -> np.ndarray:
    """A request's penalties on its float32 logits `row` (changed in place, and returned): `seen` marks
    the ids of its prompt and output, `counts` how often each id is in its output. Repetition as in
    transformers (over prompt and output: positive logits divided, negative ones multiplied), then
    frequency and presence as in OpenAI (output only), each subtracted in float64. The engines that
    apply penalties on their device follow this step by step (engines/torch/sample.py)."""
    if repetition != 1.0:
        r = np.float32(repetition)  # divided in float32 (numpy 2 would take a float64 scalar's type)
        sel = row[seen]
        row[seen] = np.where(sel > 0, sel / r, sel * r)
    if frequency:
        row -= np.float64(frequency) * counts
    if presence:
        row -= np.float64(presence) * (counts > 0)
    return row


def draw_tokens(logits: np.ndarray, draws: Draws) -> np.ndarray:
    """The tokens `draws` draws from the host logits [len(draws.rows), vocab] of its rows (bans
    already applied; changed in place). This is the definition the engines that draw on their
    device follow (engines/torch/sample.py, draw_kernel.py): logits / temperature (float32); where
    `top_k`, every logit below the k-th largest out; each token's weight an integer (`weights`);
    where `top_p`, the tokens in order of logit (ties: lower id first) while the weight before them
    is under `top_p` times the weight of all; then the first token, in id order, where the cumulative
    weight of the tokens kept passes `u` times their total. A row at temperature 0 takes the argmax
    (its penalties, where it has any, applied by the caller first: `penalize`)."""
    out = np.empty(len(logits), dtype=np.int64)
    for i, row in enumerate(logits):
        out[i] = draw_token(row, float(draws.temperature[i]), int(draws.top_k[i]), float(draws.top_p[i]),
                            float(draws.u[i]))
    return out


def weight_shift(vocab: int) -> int:
    """The weights' scale, 2**shift: as fine as a sum over the whole vocabulary allows while every
    partial sum stays exact in float64 (< 2**53), where it is compared with u or top_p times a total."""
    return 53 - int(vocab).bit_length()


def weights(z: np.ndarray, top: np.float32, vocab: int) -> np.ndarray:
    """Each token's weight, int64: exp(z - top) in float64 times 2**weight_shift(vocab), truncated
    (a logit ~26 below the top weighs 0 at 32,000 ids). Integers because their sums are exact in any
    order: a device sums in blocks and trees where numpy sums in a line, and float sums over a flat
    distribution (a random model's) once drew different tokens from the same logits."""
    e = np.exp(z.astype(np.float64) - np.float64(top))
    return (e * float(1 << weight_shift(vocab))).astype(np.int64)


def draw_token(row: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """One row of `draw_tokens` (float32 logits [vocab], changed in place); temperature 0: the argmax
    (the lowest id among equals)."""
    if temperature == 0:
        best = int(row.argmax())
        if not np.isfinite(row[best]):
            raise ValueError("no token can be chosen from these logits")
        return best
    row /= np.float32(temperature)
    v = len(row)
    top = row.max()
    if not np.isfinite(top):  # every logit -inf (all banned), or one overflowed or NaN: nothing to draw from
        raise ValueError("no token can be drawn from these logits")
    ids = None  # every id
    if 0 < top_k < v:  # ties with the k-th stay in, as transformers' top-k keeps them
        ids = np.flatnonzero(row >= np.partition(row, v - top_k)[v - top_k])
        row = row[ids]
    w = weights(row, top, v)  # the scale is the whole vocabulary's, whatever is kept
    if top_p < 1.0:  # the tokens out weigh 0 and keep their place in id order
        w[~_nucleus(w, np.float64(np.float32(top_p)) * float(w.sum()), row)] = 0
    j = _pass(w, u)
    return j if ids is None else int(ids[j])


def _pass(w: np.ndarray, u: float, block: int = 256) -> int:
    """The first index where the cumulative sum of the weights `w` passes `u` times their total (there
    is one: u < 1, and a float64 product of a positive total by a u < 1 rounds below the total): the
    blocks' sums first, then the cumulative sum inside one block (integers: exact either way; a whole
    row's cumulative sum took as long as the rest of a draw)."""
    ends = np.cumsum(np.add.reduceat(w, np.arange(0, len(w), block)))
    if not ends[-1]:  # a top_p that float32 rounds to 0 keeps nothing
        raise ValueError("no token can be drawn from these logits")
    target = u * float(ends[-1])  # sums < 2**53: exact as float64
    b = int(np.searchsorted(ends, target, side="right"))
    inside = (ends[b - 1] if b else 0) + np.cumsum(w[b * block:(b + 1) * block])
    return b * block + int(np.searchsorted(inside, target, side="right"))


def _nucleus(w: np.ndarray, mass: float, z: np.ndarray) -> np.ndarray:
    """The tokens, in descending order of their float32 logits `z` (ties: lower index first), while
    the weight before them (int64 `w`) is below `mass`: a mask. Sorts only the m largest (from 64,
    then as many as their weight says are needed; a flat distribution at once the whole) until their
    weight reaches `mass`; every token before a candidate is a candidate (weights follow the logits), so
    this is exactly what a sort of every logit gives (a full sort of 32,000 takes ~3 ms a row on a CPU
    core, and a trained model's nucleus is mostly a few dozen tokens)."""
    n, m = len(w), 64
    while True:
        if m >= n // 4:
            cand = np.arange(n)
        else:
            cand = np.flatnonzero(w >= np.partition(w, n - m)[n - m])  # the m largest, their ties
        # descending logit, ties by index: one uint64 key each (a float32's bits, the negative ones'
        # magnitude negated, order as its value does; -0 as +0), whose sort took 1.5 ms over 32,000
        # where a stable argsort took 2.6
        bits = z[cand].view(np.int32).astype(np.int64)
        value = np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
        key = ((0x7FFFFFFF - value).astype(np.uint64) << np.uint64(32)) | cand.astype(np.uint64)
        order = (np.sort(key) & np.uint64(0xFFFFFFFF)).astype(np.int64)
        sw = w[order]
        cum = np.cumsum(sw)
        if len(cand) == n or cum[-1] >= mass:
            mask = np.zeros(n, dtype=bool)
            mask[order[cum - sw < mass]] = True
            return mask
        m = int(m * max(4.0, 2.0 * mass / max(float(cum[-1]), 1.0)))


class Engine(abc.ABC):
    max_slots: int
    max_seq_len: int
    vocab_size: int

    @abc.abstractmethod
    def prefill(self, slot: int, token_ids: np.ndarray) -> np.ndarray:
        """Run the prompt `token_ids` (int [n]) into empty `slot`; return the last logits [vocab]."""

    @abc.abstractmethod
    def decode(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """One step: append `tokens[i]` to the sequence in `slots[i]`; return logits [len(slots), vocab]."""

    def prefill_batch(self, slots, prompts) -> np.ndarray:
        """Prefill several empty slots (`prompts[i]` into `slots[i]`); return the last logits [n, vocab].

        Engines that can run prompts of different lengths in one forward override this.
        """
        return np.stack([self.prefill(int(s), p) for s, p in zip(slots, prompts)])

    #: True where `prefill_cached` runs a prompt on top of the KV a slot still holds (ONNX Runtime;
    #: torch with its varlen Triton attention); the others keep this default
    can_reuse_prefix = False
    #: True where `prefill_cached` computes several prompts in one forward (torch); where it runs
    #: them one after another (ONNX Runtime), the scheduler hands it one at a time, so that each
    #: prompt's first token goes out when its own prefill ends, not when the admission's last does
    batches_cached_prefills = False
    #: True where a long prompt is better prefilled a piece at a time between decode steps (the
    #: scheduler's `prefill_chunk`, on engines that can reuse a prefix): a prefill there stalls every
    #: running stream for its whole length
    prompt_chunks = True
    #: prompt tokens `prefill_cached` must compute at least (where fewer would run another kernel
    #: path whose rounding differs from a full prefill's: see engines/ort.py)
    reuse_min_new = 1

    def prefill_cached(self, slots, prompts, cached) -> np.ndarray:
        """Prefill `prompts[i]` into `slots[i]`, whose KV positions [0, cached[i]) still hold the KV of
        `prompts[i][:cached[i]]` (left by the slot's previous sequence, put there by `copy_prefix`, or
        by the pieces of the same prompt prefilled before: the scheduler's `prefill_chunk`); only the
        tokens after them are computed (`cached[i] <= len(prompts[i]) -
        reuse_min_new`). Returns the last logits [n, vocab], as `prefill_batch` does. This default,
        for engines that cannot (`can_reuse_prefix` False), ignores the cache: a full prefill."""
        return self.prefill_batch(slots, prompts)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the KV of positions [0, n) of slot `src` (running or released) into released slot
        `dst`, for a `prefill_cached` into `dst` that reuses them."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy KV between slots")

    def decode_greedy(self, slots: np.ndarray, tokens: np.ndarray, ban: Ban | None = None) -> np.ndarray:
        """`decode` followed by argmax: the next token of each slot (int64 [len(slots)]).

        `ban`: token ids that must not be chosen in some rows (a request's end ids before its
        `min_tokens`). Engines on a device override this to take the argmax there and copy back
        only the ids. A row whose logits are not finite gets NONFINITE.
        """
        return greedy_tokens(self.decode(slots, tokens), ban)

    #: True where `decode_greedy_begin(..., chain=step)` launches without waiting for `step`
    can_chain = False

    #: True where `decode_greedy_begin(..., prompts=...)` prefills new sequences inside a decode
    #: step (at most `mix_prompts` prompts and `mix_tokens` prompt tokens a step)
    can_mix = False
    mix_tokens = 0
    mix_prompts = 0

    #: True where `decode_greedy_begin(..., draws=...)` chooses the tokens of sampled rows, and of rows
    #: with penalties, itself (on its device, where the logits are), so that such requests chain and
    #: ride in decode steps as greedy ones do; elsewhere the scheduler brings the logits of a step with
    #: such rows to the host. Penalties need the tokens of each sequence: `track`
    can_sample = False

    def track(self, slot: int, prompt_ids: np.ndarray) -> None:
        """Keep the counts of the tokens of the sequence just placed in `slot` (its prompt
        `prompt_ids`; then every token a decode step feeds it), for the penalties of its `Draws` rows,
        until `release`. Engines with `can_sample`."""
        raise NotImplementedError(f"{type(self).__name__} keeps no token counts (can_sample is False)")

    def decode_greedy_begin(self, slots, tokens=None, ban: Ban | None = None, chain=None, prompts=None,
                            draws: Draws | None = None):
        """Start a step; `.result()` gives its tokens: each row's argmax, or for the rows of `draws`
        the token drawn (`draw_tokens`; engines with `can_sample`). Here it runs at once; engines on a
        device return while it runs, and with `chain` (the previous step, same slots) take its
        tokens on the device, and with `prompts` ((slots, ids[, cached counts])) also prefill new
        sequences in the same forward, on top of a cached prefix where `can_reuse_prefix` (see
        `engines.torch.TorchEngine.decode_greedy_begin`)."""
        if prompts is not None and len(prompts[0]):
            raise ValueError(f"{type(self).__name__} cannot run prompts inside a decode step")
        if draws is not None:
            raise ValueError(f"{type(self).__name__} cannot draw tokens itself (can_sample is False)")
        if chain is not None:
            tokens = chain.result()
        return Done(self.decode_greedy(slots, tokens, ban))

    def warmup(self) -> None:
        """Prepare for the first request (the torch engine captures its CUDA graphs); called at load."""

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot` (its KV storage is reused by the next prefill; where
        `can_reuse_prefix`, the KV stays readable by `prefill_cached` and `copy_prefix` until then)."""

    def length(self, slot: int) -> int:
        """Tokens currently cached for `slot`."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"engine": type(self).__name__, "max_slots": self.max_slots, "max_seq_len": self.max_seq_len}


class Done:
    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def result(self) -> np.ndarray:
        return self.tokens

