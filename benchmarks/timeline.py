"""Where a first token's time goes: reads the folder a server wrote with TRITONCHAT_TIMELINE set
(python_backend/timeline.py) and prints, for the requests whose entry started within [--since,
--until] (`time.perf_counter` seconds; default: all), the time between each two marks of their
first token, p50 and mean in ms.

    TRITONCHAT_TIMELINE=/tmp/timeline tritonchat serve --model-repository REPO &
    tritonchat bench --url 127.0.0.1:8001 ... ; kill %1
    python benchmarks/timeline.py /tmp/timeline

A benchmark aid: it prints figures, asserts nothing (docs/benchmarks-gpu.md, twenty-third session).
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

# a first token's way; `send_end` (the generator's send returned: the server process took the response)
# is reported beside it, since the entry may have the response before the send returns
ORDER = ["entry_start", "prompt_ready", "gen_execute", "gen_submitted", "admitted", "computed", "posted",
         "send_start", "entry_got", "entry_sent"]


def load(folder: Path) -> dict[str, dict[str, float]]:
    """request id -> mark -> the first time it was seen."""
    marks: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            name, rid, t = line.split()
            marks[rid].setdefault(name, float(t))
    return marks


def report(marks: dict, since: float = 0.0, until: float = float("inf")) -> list[str]:
    """The time between each two marks of a first token's way that follow each other in a request's
    record (with `generate: entry` there is no generator `execute` and no entry hop back: the courier
    sends to the client, so a first token's way ends at its `send_end`)."""
    rows = sorted((m for m in marks.values() if "entry_start" in m and ("entry_got" in m or "send_end" in m)
                   and since <= m["entry_start"] <= until), key=lambda m: m["entry_start"])
    lines = [f"{len(rows)} requests"]
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for m in rows:
        seen = [k for k in ORDER if k in m]
        for a, b in zip(seen, seen[1:]):
            gaps[a, b].append(1e3 * (m[b] - m[a]))
        for a, b in (("send_start", "send_end"), ("entry_start", "entry_sent" if "entry_sent" in m else "send_end")):
            if a in m and b in m:
                gaps[a, b].append(1e3 * (m[b] - m[a]))
    for (a, b), g in gaps.items():
        lines.append(f"{a:>14} -> {b:<14} p50 {statistics.median(g):7.3f}  mean {statistics.mean(g):7.3f} ms")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--since", type=float, default=0.0)
    ap.add_argument("--until", type=float, default=float("inf"))
    args = ap.parse_args()
    print("\n".join(report(load(args.folder), args.since, args.until)))


if __name__ == "__main__":
    main()
