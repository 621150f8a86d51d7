#!/usr/bin/env python3
"""The scheduler's own cost at 128 slots, without a GPU: C closed-loop streams through the real
`Scheduler` on the deterministic fake engine (tests/fake_engine.py: 128 slots, prefix reuse, prompts
inside decode steps, chained steps that sleep 1 ms, as the host waits for a GPU step), random
128-token prompts, 32 tokens out. Prints TTFT p50 / mean, tokens/s and the time requests waited for
a slot (`queue_s`, ms in all). A benchmark aid: figures, no assertions (docs/benchmarks-gpu.md,
thirty-first session: placing a prompt compared it with every slot, ~0.45 ms a prompt at 128 slots).

    python3 benchmarks/sched_placement.py STREAMS REQUESTS_PER_STREAM
"""
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_engine import FakeEngine, FakeTokenizer  # noqa: E402
from tritonchat.python_backend.batching.detokenize import TextTracker  # noqa: E402
from tritonchat.python_backend.batching.sampling import SamplingParams  # noqa: E402
from tritonchat.python_backend.batching.scheduler import Scheduler  # noqa: E402
from tritonchat.python_backend.batching.sequence import Sequence  # noqa: E402

C, PER, PLEN, OUT = int(sys.argv[1]), int(sys.argv[2]), 128, 32
# a 64-id vocabulary keeps the fake engine's own work (logits per row) small beside what is measured
ex = FakeEngine(max_slots=128, max_seq_len=256, vocab_size=64, can_chain=True, can_mix=True, mix_tokens=1024,
                can_reuse=True, step_s=0.001)
sched = Scheduler(ex)
ttft, lock = [], threading.Lock()


def stream(i):
    r = np.random.default_rng(i)
    for _ in range(PER):
        done, t0, first = threading.Event(), time.perf_counter(), []

        def sink(out):
            if not first:
                first.append(time.perf_counter())
            if out.final:
                done.set()
        sched.submit(Sequence(r.integers(3, 64, PLEN).astype(np.int64),
                              SamplingParams(max_tokens=OUT, min_tokens=OUT, end_ids=()),
                              TextTracker(FakeTokenizer(64)), sink, stream=True))
        done.wait(60)
        with lock:
            ttft.append(1e3 * (first[0] - t0))


t = time.perf_counter()
threads = [threading.Thread(target=stream, args=(i,)) for i in range(C)]
for x in threads:
    x.start()
for x in threads:
    x.join()
wall = time.perf_counter() - t
sched.shutdown()
print(f"C={C}: TTFT p50 {statistics.median(ttft):.2f} ms mean {statistics.mean(ttft):.2f}  "
      f"{C * PER * OUT / wall:.0f} tok/s  waited for a slot {1e3 * sched.stats.queue_s:.0f} ms in all")
