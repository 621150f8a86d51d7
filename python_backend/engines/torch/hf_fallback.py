"""The torch engine's fallback for architectures without a native forward (gpt2, ...): the
transformers model itself, one `DynamicCache` per slot, one sequence at a time. Correct, not fast;
the engine warns when it takes it and says so in `describe()["path"]` ("hf-fallback")."""

from __future__ import annotations

import torch


class HFSlots:
    def __init__(self, model, max_slots: int, device):
        self.model = model
        self.device = device
        self.caches: list = [None] * max_slots

    def _run(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        if self.caches[slot] is None:
            self.caches[slot] = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids.view(1, -1), past_key_values=self.caches[slot], use_cache=True)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1]

    def prefill(self, slot, ids):
        self.caches[slot] = None
        return self._run(slot, ids).float()[None]

    def decode(self, slots, tokens):
        return torch.stack([self._run(int(s), t.view(1)) for s, t in zip(slots.tolist(), tokens)]).float()

    def release(self, slot):
        self.caches[slot] = None
