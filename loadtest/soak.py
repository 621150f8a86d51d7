"""`tritonchat soak`: the server at saturation for N minutes (a benchmark that prints figures, not a
test). Mixed prompt and answer lengths, greedy and sampled requests, random cancellations, over gRPC
streaming on loopback. Prints done / errors / hung / cancelled and the RSS of every process of the
server (tritonserver and each model's stub) at the start, after the warm-up and at the end.

A request is "hung" when it made no progress for `hang_s` seconds (it is then cancelled and counted);
"cancelled" are the ones this client cancelled on purpose. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They", "One day, a bird",
           "The sun was hot and the children", "Sam had a red ball.", "Mom said", "There was a big tree"]


@dataclass
class Tally:
    done: int = 0
    errors: int = 0
    hung: int = 0
    cancelled: int = 0
    tokens: int = 0
    error_texts: collections.Counter = field(default_factory=collections.Counter)


def processes(server_pid: int) -> dict[str, int]:
    """RSS in bytes of tritonserver and of each process below it, by a readable name."""
    out = {}

    def walk(pid: int):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
        except OSError:
            return
        name = "tritonserver" if pid == server_pid else next(
            (Path(c.decode()).parent.parent.name for c in cmd if c.endswith(b"model.py")), cmd[0].decode())
        key = name if name not in out else f"{name}[{pid}]"
        out[key] = rss
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for c in children:
            walk(int(c))

    walk(server_pid)
    return out


def render_rss(label: str, rss: dict[str, int]) -> str:
    return f"{label:>10}: " + "  ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(rss.items()))


async def worker(url: str, stop_at: float, tally: Tally, rng: random.Random, *, cancel_p: float, hang_s: float):
    from tritonchat.client import AsyncChatClient, TritonChatError

    async with AsyncChatClient(url) as client:
        while time.monotonic() < stop_at:
            n = rng.choice((8, 32, 64, 128, 256))
            kw = dict(max_tokens=n)
            if rng.random() < 0.5:
                kw.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
            cancel_after = rng.randint(1, 6) if rng.random() < cancel_p else None
            stream = client.stream(rng.choice(PROMPTS), **kw)
            got = 0
            try:
                while True:
                    try:
                        delta = await asyncio.wait_for(stream.__anext__(), hang_s)
                    except StopAsyncIteration:
                        tally.done += 1
                        break
                    got += 1
                    tally.tokens += len(delta.output_ids or [])
                    if cancel_after is not None and got >= cancel_after:
                        tally.cancelled += 1
                        break
            except asyncio.TimeoutError:
                tally.hung += 1
            except TritonChatError as exc:
                tally.errors += 1
                tally.error_texts[str(exc)[:120]] += 1
            finally:
                await stream.aclose()


async def run_level(url: str, concurrency: int, seconds: float, seed: int, cancel_p: float, hang_s: float) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(worker(url, stop_at, tally, random.Random(seed + i), cancel_p=cancel_p, hang_s=hang_s)
                           for i in range(concurrency)))
    return tally


def run_soak(model_repository: Path | None, url: str | None, minutes: float, concurrency: int, warmup_s: float,
             cancel_p: float, hang_s: float, seed: int, out: Path | None) -> int:
    from contextlib import nullcontext

    from rich.console import Console

    from tritonchat.loadtest.net import check_loopback
    from tritonchat.server import TritonServer

    console = Console()
    if model_repository is None and url is None:
        console.print("[red]error:[/] give --model-repository (a server is started) or --url (loopback)")
        return 2
    server = TritonServer(model_repository) if model_repository else nullcontext()
    with server as srv:
        url = srv.grpc_url if srv else url
        check_loopback(url)
        pid = srv.process.pid if srv else None
        rss = {"start": processes(pid) if pid else {}}
        console.print(f"soak: {concurrency} streams on {url} for {minutes:g} min after a {warmup_s:g} s warm-up "
                      f"(cancel p={cancel_p:g}, hung after {hang_s:g} s without progress)")
        asyncio.run(run_level(url, concurrency, warmup_s, seed, cancel_p, hang_s))
        rss["warm"] = processes(pid) if pid else {}
        t = time.monotonic()
        tally = asyncio.run(run_level(url, concurrency, 60 * minutes, seed + 10_000, cancel_p, hang_s))
        took = time.monotonic() - t
        rss["end"] = processes(pid) if pid else {}
    console.print(f"done {tally.done}  errors {tally.errors}  hung {tally.hung}  cancelled {tally.cancelled}  "
                  f"in {took:.0f} s ({(tally.done + tally.cancelled) / took:.1f} requests/s)")
    for text, n in tally.error_texts.most_common(5):
        console.print(f"  {n} x {text}")
    for label, values in rss.items():
        if values:
            console.print(render_rss(label, values))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps({
            "minutes": minutes, "concurrency": concurrency, "cancel_p": cancel_p, "seconds": took,
            "done": tally.done, "errors": tally.errors, "hung": tally.hung, "cancelled": tally.cancelled,
            "error_texts": dict(tally.error_texts), "rss_bytes": rss}, indent=1))
    return 1 if tally.hung else 0
