"""Prefix reuse through the real tritonserver: multi-turn chat through the public `ensemble` (chat
messages, the default chat text of stories260K), with `prefix_reuse` on (the build's default) and
off (a build with `models.generator.prefix_reuse: false`): the same answers, and `tritonchat_prefix_reused_tokens_total` counts the reused prompt tokens only when on.
(The slot choice and the bitwise prefill: tests/test_prefix_reuse.py.)"""

from __future__ import annotations

import threading
import urllib.request

USERS = ["Once upon a time, there was a little girl named Lily.", "She went to the park with her mom.",
         "They saw a big dog.", "The dog wanted to play.", "Tom had a red ball.", "It was a sunny day."]


def _reused(metrics_url: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tritonchat_prefix_reused_tokens_total{"))


def _conversations(repo) -> tuple[dict, float, dict]:
    """4 conversations of 4 turns (history re-sent each turn), 2 clients at once: the answers, the
    reused-token metric, and the prompt length of each turn."""
    from tritonchat.client import ChatClient
    from tritonchat.server import TritonServer

    answers, lengths = {}, {}
    with TritonServer(repo) as srv:
        def client(k):
            with ChatClient(srv.grpc_url) as chat:
                for c in (k, k + 2):
                    messages = []
                    for turn in range(4):
                        messages.append({"role": "user", "content": USERS[(c + turn) % len(USERS)]})
                        out = chat.generate(messages, max_tokens=12, apply_chat_template=True)
                        answers[(c, turn)] = out.output_ids
                        lengths[(c, turn)] = out.num_input_tokens
                        messages.append({"role": "assistant", "content": out.text})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return answers, _reused(srv.metrics_url), lengths


def test_multi_turn_chat_answers_are_the_same_with_prefix_reuse_on_and_off(stories_repo, tmp_path):
    from e2e_helpers import STORIES, build_repo

    setting = 'key: "prefix_reuse", value: { string_value: "%s" }'
    assert setting % "true" in (stories_repo / "generator" / "config.pbtxt").read_text()  # the default
    off_repo = build_repo(STORIES, tmp_path / "repo", models={"generator": {"prefix_reuse": False}})
    assert setting % "false" in (off_repo / "generator" / "config.pbtxt").read_text()

    with_reuse, reused, lengths = _conversations(stories_repo)
    without, not_reused, _ = _conversations(off_repo)
    assert len(with_reuse) == 16 and all(with_reuse.values())
    assert with_reuse == without
    assert not_reused == 0
    # each later turn reuses the whole prompt of the turn before it (its KV, computed by that turn's
    # prefill; the answer's KV, written by decode steps, is computed again: batching/prefix.py)
    assert reused == sum(n for (c, turn), n in lengths.items() if turn < 3)
