"""Per-request sampling parameters and the token sampler (numpy, host side); for steps whose
tokens the engine chooses itself (the argmax, or on engines that can, a draw and penalties: `Draws`),
the end ids that step must mask (`greedy_ban`) and the draws of its sampled and penalised rows
(`draws_of`).

Semantics follow the libraries users compare against:
- `temperature` 0 (the default) is greedy; `top_k` 0 and `top_p` 1 are off.
- `repetition_penalty` as in transformers (prompt and output tokens: positive logits divided,
  negative multiplied); `presence_penalty` / `frequency_penalty` as in OpenAI (output tokens).
- `min_tokens` masks the end ids until that many tokens were generated.
- bad words: a word's last token is masked when the output so far ends with the word's prefix.
- a sampled token is drawn with one uniform number from the request's generator (seeded by `seed`),
  by `engines.base.draw_tokens` on the host or its equal on a device: the same uniform numbers in
  the same order either way, so a seeded answer does not depend on where its tokens were drawn.
  Penalties likewise (`engines.base.penalize`: the host's counts here, the engine's on a device).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..engines.base import NONFINITE, Ban, Draws, draw_token, penalize


class InvalidParameter(ValueError):
    """A request value out of range; the message is sent to the client (INVALID_ARG)."""


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    end_ids: tuple[int, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust: the batch can take one argmax."""
        return self.argmax_only and self.min_tokens == 0

    @property
    def argmax_only(self) -> bool:
        """Greedy with at most `min_tokens` to honour (a ban of the end ids): no host-side logits needed."""
        return self.greedy and self.stateless

    @property
    def stateless(self) -> bool:
        """The next token depends on the logits, `min_tokens` and one uniform number only (no penalty
        or bad word reads the output so far)."""
        return not self.penalized and not self.bad_words_ids

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def drawable(self) -> bool:
        """An engine that draws (`can_sample`) can choose every token of this request: all but bad
        words, which read the output's last tokens (its penalties read counts the engine keeps)."""
        return not self.bad_words_ids

    def validate(self, max_seq_len: int) -> "SamplingParams":
        def bad(msg):
            raise InvalidParameter(msg)

        if self.max_tokens <= 0:
            bad(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.max_tokens >= max_seq_len:
            bad(f"max_tokens {self.max_tokens} exceeds the model's context of {max_seq_len} tokens")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (np.isfinite(v) and -2.0 <= v <= 2.0):
                bad(f"{name} must be in [-2, 2], got {v}")
        if self.min_tokens < 0:
            bad(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            bad(f"min_tokens {self.min_tokens} is larger than max_tokens {self.max_tokens}")
        return self


class Sampler:
    """Chooses the next token of one sequence; holds the sequence's RNG and token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: np.ndarray, vocab_size: int):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.vocab_size = vocab_size
        self.output_counts = np.zeros(vocab_size, dtype=np.int32)
        self.seen = np.zeros(vocab_size, dtype=bool)
        self.seen[np.asarray(prompt_ids, dtype=np.int64) % vocab_size] = True
        self.end_ids = np.array([e for e in params.end_ids if 0 <= e < vocab_size], dtype=np.int64)
        self.end_key = tuple(self.end_ids.tolist())  # compared per row and step (greedy_ban)
        self.generated = 0
        self.history: list[int] = []
        # read per token and per step: computed once
        self.greedy, self.argmax_only, self.stateless = params.greedy, params.argmax_only, params.stateless
        self.drawable, self.penalized = params.drawable, params.penalized

    def observe(self, token: int) -> None:
        self.generated += 1
        if self.stateless:  # nothing reads the history or the counts (the hot path of big batches)
            return
        self.history.append(token)
        if 0 <= token < self.vocab_size:
            self.output_counts[token] += 1
            self.seen[token] = True

    def uniform(self) -> float:
        """The uniform number the next sampled token is drawn with (one per sampled token, in order)."""
        return float(self.rng.random())

    def draw_params(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) of its draws: top_k 0 where it keeps the whole vocabulary."""
        p = self.p
        # top_p as float32, as `Draws` carries it to a device: the same threshold on either side
        return p.temperature, p.top_k if 0 < p.top_k < self.vocab_size else 0, float(np.float32(p.top_p))

    def choose(self, logits: np.ndarray) -> int:
        p = self.p
        if p.plain:
            return int(np.argmax(logits))
        logits = self.adjusted(logits)
        if p.greedy:
            return int(np.argmax(logits))
        return draw_token(logits, *self.draw_params(), self.uniform())

    def penalties(self) -> tuple[float, float, float]:
        """(repetition, presence, frequency) of its `Draws` rows."""
        return self.p.repetition_penalty, self.p.presence_penalty, self.p.frequency_penalty

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of `logits` with this request's penalties and bans applied."""
        p = self.p
        logits = penalize(logits.astype(np.float32, copy=True), self.seen, self.output_counts, *self.penalties())
        if self.generated < p.min_tokens and len(self.end_ids):
            logits[self.end_ids] = -np.inf
        for word in p.bad_words_ids:
            if len(word) == 1 or self.history[-(len(word) - 1):] == list(word[:-1]):
                logits[word[-1]] = -np.inf
        return logits


NONFINITE_MESSAGE = "the model produced non-finite logits (NaN or inf) for this request"


def sample_batch(samplers: list[Sampler], logits: np.ndarray) -> tuple[list[int], dict[int, str]]:
    """Next token for each row, and the rows that failed (row -> message; their token is
    NONFINITE). Rows whose request is plain greedy share one argmax. A failure stays with its row:
    the other requests of the step go on."""
    plain = [i for i, s in enumerate(samplers) if s.p.plain]
    out = [0] * len(samplers)
    errors: dict[int, str] = {}
    if plain:
        best = np.argmax(logits[plain], axis=-1)
        # argmax picks a NaN or +inf where the row has one: checking the chosen logit finds them
        ok = np.isfinite(logits[plain, best])
        for i, t, good in zip(plain, best, ok):
            out[i] = int(t) if good else NONFINITE
            if not good:
                errors[i] = NONFINITE_MESSAGE
    for i, s in enumerate(samplers):
        if not s.p.plain:
            out[i], err = choose_safely(s, logits[i])
            if err:
                errors[i] = err
    return out, errors


def choose_safely(sampler: Sampler, row: np.ndarray) -> tuple[int, str | None]:
    """`sampler.choose(row)`, or (NONFINITE, message) where the row or the sampling fails."""
    if np.isnan(row).any() or np.isposinf(row).any():
        return NONFINITE, NONFINITE_MESSAGE
    try:
        return sampler.choose(row), None
    except Exception as exc:  # noqa: BLE001 - one request's sampling must not fail the batch
        return NONFINITE, f"sampling failed for this request ({type(exc).__name__})"


def greedy_ban(samplers: list[Sampler], ahead=0, draw: bool = False):
    """For a batch whose tokens the engine chooses (the argmax; with `draw`, sampled and penalised rows
    chosen by the engine too: `draws_of`): None (no ban) or the `Ban` of end ids for rows still under their
    `min_tokens` (`ahead` steps from now: one number, or one per row); False when some row needs the
    logits on the host."""
    rows, key, ids = [], None, None
    for i, s in enumerate(samplers):
        if not (s.argmax_only or draw and s.drawable):
            return False
        a = ahead if isinstance(ahead, int) else ahead[i]
        if s.generated + a < s.p.min_tokens and s.end_key:
            if key is None:
                key, ids = s.end_key, s.end_ids
            elif s.end_key != key:
                return False  # rows ban different ids: one mask cannot serve them
            rows.append(i)
    return Ban(np.array(rows, dtype=np.int64), ids) if rows else None


def draws_of(samplers: list[Sampler]) -> Draws | None:
    """The `Draws` of a step over these rows: the sampled ones, and the greedy ones with penalties
    (temperature 0). Each sampled row's next uniform number is taken from its generator now: call
    once per step launched. None where every row takes the plain argmax."""
    idx = [i for i, s in enumerate(samplers) if not s.argmax_only]
    if not idx:
        return None
    rows = [samplers[i] for i in idx]
    params = [(0.0, 0, 1.0, 0.0) if s.greedy else (*s.draw_params(), s.uniform()) for s in rows]
    temperature, top_k, top_p, u = zip(*params)
    penalties = np.array([s.penalties() for s in rows], dtype=np.float64).T \
        if any(s.penalized for s in rows) else None
    return Draws(np.array(idx, dtype=np.int64),
                 np.array(temperature, dtype=np.float32), np.array(top_k, dtype=np.int64),
                 np.array(top_p, dtype=np.float32), np.array(u, dtype=np.float64), penalties)


def ban_key(rows: list, ban) -> tuple | None:
    """The end ids `ban` masks (the common key of `rows`, sequences with samplers), None without a ban."""
    return None if not ban else rows[int(ban.rows[0])].sampler.end_key
