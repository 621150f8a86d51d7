"""Multi-turn chat with prefix reuse on and off: time to first token per turn, and the same answers.

Each conversation opens with a shared system prompt and a user message; every turn sends the whole
history again (system, then user / assistant messages, then the new user message) through the
public `ensemble` with `apply_chat_template`, streaming, greedy. `--concurrency` clients run the
conversations, each one conversation at a time, turn after turn. The same workload runs against
two repositories of one model, built with `models.generator.prefix_reuse` true and false, in
alternating order (`--rounds`), each on a fresh tritonserver; it prints TTFT p50 / p99 per turn and
mode, the ratio on / off, the prompt tokens the generator reused (its Prometheus counter), and
whether every answer was the same in both modes.

    .venv/bin/tritonchat synthetic-model --arch llama --tokenizer llama2 --out repos/hf-stories15m \\
        --layers 6 --hidden 288 --heads 6 --kv-heads 6 --intermediate 768 --max-positions 512
    .venv/bin/python benchmarks/multiturn.py --model repos/hf-stories15m --work repos/multiturn

User messages are cut from ../shared/data/tinyshakespeare.txt (seeded), or a built-in text where it
is absent. A benchmark, not a test: it prints figures and asserts nothing (docs/benchmarks.md,
"Prefix reuse").
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import urllib.request
from pathlib import Path

from tritonchat.loadtest.stats import percentile

FALLBACK = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
            "friends. One day, she saw a big red ball under a tree and ran to get it. ")


def words() -> list[str]:
    from tritonchat.build.synthetic import shared_dir

    path = shared_dir() / "data" / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else FALLBACK * 50
    return text.split()


def conversations(n: int, turns: int, system_words: int, user_words: int, seed: int) -> tuple[str, list]:
    """The shared system prompt and, per conversation, its user messages."""
    rng, w = random.Random(seed), words()

    def cut(k: int) -> str:
        i = rng.randrange(len(w) - k)
        return " ".join(w[i:i + k])

    return cut(system_words), [[cut(user_words) for _ in range(turns)] for _ in range(n)]


def build(model: Path, work: Path, reuse: bool, max_batch_size: int, config: Path | None = None) -> Path:
    """The repository of one mode; `config`: a build config file (`tritonchat build --config`), e.g.
    the torch engine on a GPU, under the two modes' own settings."""
    from tritonchat.build.pipeline import run_build
    from tritonchat.build.settings import load_settings

    out = work / ("reuse-on" if reuse else "reuse-off")
    if not (out / "manifest.json").exists():
        settings = load_settings(config, max_batch_size=max_batch_size, models={"generator": {"prefix_reuse": reuse}})
        run_build(str(model), out, settings)
    return out


def generator_metrics(metrics_url: str) -> dict:
    """The generator's reused prompt tokens, and its mean time to first token (arrival at the
    generator to first token: the client's TTFT less preprocessing, the entry and the network)."""
    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5).read().decode()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    count = total("tritonchat_time_to_first_token_seconds_count")
    return {"reused": total("tritonchat_prefix_reused_tokens_total"),
            "ttft": total("tritonchat_time_to_first_token_seconds_sum") / count if count else None}


class Turn:
    """One turn's answer as it streams in: the time to its first delta, the ids and text."""

    def __init__(self):
        self.t0, self.ttft, self.ids, self.answer, self.n_in = time.perf_counter(), None, [], "", None

    def add(self, d) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.ids += d.output_ids
        self.answer += d.text
        self.n_in = d.num_input_tokens or self.n_in

    def result(self, error: Exception | None = None) -> tuple:
        """(ttft s, prompt tokens, output ids, error text): a pass's record of this turn."""
        if error is not None:
            return None, self.n_in, self.ids, f"{type(error).__name__}: {error}"
        return self.ttft, self.n_in, self.ids, None


async def run_workload(url: str, system: str, users: list, concurrency: int, max_tokens: int) -> tuple[dict, float]:
    """{(conversation, turn): (ttft s, prompt tokens, output ids, error)} of one pass, and when its
    warm-up ended (`time.perf_counter`)."""
    from tritonchat.client import AsyncChatClient

    results, todo = {}, list(range(len(users)))
    async with AsyncChatClient(url) as client:
        async def one_client():
            while todo:
                c = todo.pop(0)
                messages = [{"role": "system", "content": system}]
                for turn, text in enumerate(users[c]):
                    messages.append({"role": "user", "content": text})
                    t = Turn()
                    try:
                        async with client.stream(messages, max_tokens=max_tokens, apply_chat_template=True) as s:
                            async for d in s:
                                t.add(d)
                    except Exception as exc:  # noqa: BLE001 - counted and printed, the pass goes on
                        results[(c, turn)] = t.result(exc)
                        break
                    results[(c, turn)] = t.result()
                    messages.append({"role": "assistant", "content": t.answer})

        # warm-up: one request per client (not measured; other text than the workload's)
        await asyncio.gather(*(client.generate("warm up " * 8, max_tokens=4) for _ in range(concurrency)))
        since = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return results, since


def run_workload_threads(url: str, system: str, users: list, concurrency: int, max_tokens: int) -> tuple:
    """`run_workload` with a thread per client and the blocking `ChatClient` (a gRPC stream per
    request from a pool of tritonclient connections): the same requests, without the asyncio gRPC
    stack, which on a 2-core VM now and then delivered an answer's responses all at once at its end
    (docs/benchmarks.md, "The TTFT tails at 4 streams")."""
    import threading

    from tritonchat.client import ChatClient

    results, todo, lock = {}, list(range(len(users))), threading.Lock()

    def one_client(client):
        while True:
            with lock:
                if not todo:
                    return
                c = todo.pop(0)
            messages = [{"role": "system", "content": system}]
            for turn, text in enumerate(users[c]):
                messages.append({"role": "user", "content": text})
                t = Turn()
                try:
                    with client.stream(messages, max_tokens=max_tokens, apply_chat_template=True) as s:
                        for d in s:
                            t.add(d)
                except Exception as exc:  # noqa: BLE001 - counted and printed, the pass goes on
                    results[(c, turn)] = t.result(exc)
                    break
                results[(c, turn)] = t.result()
                messages.append({"role": "assistant", "content": t.answer})

    with ChatClient(url) as client:
        warm = [threading.Thread(target=client.generate, args=("warm up " * 8,), kwargs={"max_tokens": 4})
                for _ in range(concurrency)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        since = time.perf_counter()
        threads = [threading.Thread(target=one_client, args=(client,)) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results, since


def run_pass(repo: Path, system: str, users: list, args, timeline: Path | None = None) -> tuple[dict, dict, float]:
    """One pass on a fresh server; `timeline`: the folder its request timeline goes to
    (python_backend/timeline.py), whose first-token breakdown of the pass's requests is printed."""
    from tritonchat.install import server_env
    from tritonchat.server import TritonServer

    env = server_env()
    if timeline is not None:
        env["TRITONCHAT_TIMELINE"] = str(timeline)
    with TritonServer(repo, env=env) as srv:
        t = time.perf_counter()
        if args.client == "threads":
            results, since = run_workload_threads(srv.grpc_url, system, users, args.concurrency, args.max_tokens)
        else:
            results, since = asyncio.run(run_workload(srv.grpc_url, system, users, args.concurrency, args.max_tokens))
        wall = time.perf_counter() - t
        gen = generator_metrics(srv.metrics_url)
    if timeline is not None:
        from timeline import load, report  # benchmarks/timeline.py, beside this script

        print("  where the first tokens' time went (every turn; ms):\n  " + "\n  ".join(report(load(timeline), since)))
    return results, gen, wall


def ms(v) -> str:
    return "-" if v is None else f"{1e3 * v:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face model folder")
    ap.add_argument("--work", type=Path, required=True, help="where the two repositories are built (or reused)")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8, help="clients at once (one conversation each)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens of each answer (greedy)")
    ap.add_argument("--system-words", type=int, default=40)
    ap.add_argument("--user-words", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="passes of each mode, alternating")
    ap.add_argument("--max-batch-size", type=int, default=16, help="the build's sequences in flight")
    ap.add_argument("--config", type=Path, help="a build config file for both repositories (e.g. engine: torch, "
                    "device: cuda, dtype: bfloat16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeline", type=Path, help="a folder: each pass's servers write their request timeline there "
                    "and the pass prints where its first tokens' time went (benchmarks/timeline.py)")
    ap.add_argument("--client", choices=("asyncio", "threads"), default="asyncio",
                    help="asyncio: AsyncChatClient in one event loop; threads: a thread and blocking ChatClient per client")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    repos = {reuse: build(args.model, args.work, reuse, args.max_batch_size, args.config)
             for reuse in (True, False)}
    system, users = conversations(args.conversations, args.turns, args.system_words, args.user_words, args.seed)
    print(f"{args.conversations} conversations x {args.turns} turns, {args.concurrency} clients ({args.client}), "
          f"{args.max_tokens} tokens an answer, system prompt {args.system_words} words, user messages "
          f"{args.user_words} words; model {args.model}", flush=True)
    runs = {True: [], False: []}
    for r in range(args.rounds):
        for reuse in ((True, False) if r % 2 == 0 else (False, True)):
            tl = args.timeline / f"round{r + 1}-{'on' if reuse else 'off'}" if args.timeline else None
            results, gen, wall = run_pass(repos[reuse], system, users, args, tl)
            runs[reuse].append(results)
            errors = [v[3] for v in results.values() if v[3]]
            prompt = sum(v[1] or 0 for v in results.values())
            client = [v[0] for v in results.values() if v[0] is not None]
            print(f"round {r + 1}, reuse {'on ' if reuse else 'off'}: {wall:.1f} s, {len(results)} answers, "
                  f"{len(errors)} errors{' (' + errors[0] + ')' if errors else ''}, prompt tokens {prompt:,}, "
                  f"reused {gen['reused']:,.0f}; TTFT mean {ms(sum(client) / max(1, len(client)))} ms, "
                  f"of which in the generator {ms(gen['ttft'])} (warm-up included)", flush=True)

    print("\nTTFT in ms over all rounds (client side, first streamed response)")
    print("| turn | prompt tokens p50 | on p50 | on p99 | off p50 | off p99 | on ÷ off (p50) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    groups = [(f"{t + 1}", [t]) for t in range(args.turns)] + [(f"2-{args.turns}", list(range(1, args.turns)))]
    for name, turns in groups:
        ttft = {m: [v[0] for res in runs[m] for (c, t), v in res.items() if t in turns and v[0] is not None]
                for m in runs}
        tokens = [v[1] for res in runs[True] for (c, t), v in res.items() if t in turns and v[1]]
        on, off = percentile(ttft[True], 50), percentile(ttft[False], 50)
        ratio = f"{on / off:.2f}" if on and off else "-"
        print(f"| {name} | {percentile(tokens, 50) or 0:.0f} | {ms(on)} | {ms(percentile(ttft[True], 99))} | "
              f"{ms(off)} | {ms(percentile(ttft[False], 99))} | {ratio} |")

    same = sum(1 for r in range(args.rounds) for c in range(args.conversations)
               if all(runs[True][r].get((c, t), (0, 0, None))[2] == runs[False][r].get((c, t), (0, 0, None))[2]
                      for t in range(args.turns)))
    print(f"\nconversations whose answers were the same with reuse on and off (same round): "
          f"{same} / {args.rounds * args.conversations}")
    between = sum(1 for m in runs for c in range(args.conversations)
                  if any(runs[m][0].get((c, t), (0, 0, None))[2] != runs[m][r].get((c, t), (0, 0, None))[2]
                         for r in range(1, args.rounds) for t in range(args.turns)))
    print(f"conversations whose answers changed between rounds of one mode: {between}")


if __name__ == "__main__":
    main()
