"""The request timeline (python_backend/timeline.py) and its reader (benchmarks/timeline.py), without
a server (the end-to-end check is in tests/test_e2e_first_senders.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import timeline as bench  # noqa: E402  (benchmarks/timeline.py)

CODE = "from tritonchat.python_backend import timeline; timeline.mark('posted', 'tc-1'); timeline.mark('send_start', '')"


def test_marks_are_written_only_where_the_environment_asks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITONCHAT_TIMELINE"}
    subprocess.run([sys.executable, "-c", CODE], env=env, check=True, cwd=tmp_path)
    assert not list(tmp_path.rglob("*.txt"))
    folder = tmp_path / "tl"
    subprocess.run([sys.executable, "-c", CODE], env={**env, "TRITONCHAT_TIMELINE": str(folder)}, check=True)
    (file,) = folder.glob("*.txt")
    lines = [line.split() for line in file.read_text().splitlines()]
    assert [line[:2] for line in lines] == [["posted", "tc-1"], ["send_start", "?"]]
    assert float(lines[0][2]) <= float(lines[1][2])


def test_the_report_gives_the_time_between_marks_of_the_requests_in_the_window(tmp_path):
    def write(pid, rows):
        (tmp_path / f"{pid}.txt").write_text("".join(f"{n} {r} {t}\n" for n, r, t in rows))

    # two requests; the second's marks 2x the first's gaps; a third outside the window
    for k, (rid, t0) in enumerate((("tc-a", 100.0), ("tc-b", 200.0), ("tc-c", 300.0))):
        s = (k + 1) / 1e3 if k < 2 else 1.0
        write(f"entry{k}", [("entry_start", rid, t0), ("prompt_ready", rid, t0 + s), ("entry_got", rid, t0 + 5 * s),
                            ("entry_sent", rid, t0 + 6 * s)])
        write(f"gen{k}", [("gen_execute", rid, t0 + 2 * s), ("posted", rid, t0 + 3 * s), ("send_start", rid, t0 + 4 * s),
                          ("send_end", rid, t0 + 7 * s), ("send_end", rid, t0 + 9 * s)])  # a later send: not the first
    lines = bench.report(bench.load(tmp_path), since=0, until=250)
    assert lines[0] == "2 requests"
    got = {tuple(line.split()[:3:2]): (float(line.split()[4]), float(line.split()[6])) for line in lines[1:]}
    assert got[("entry_start", "prompt_ready")] == (1.5, 1.5)  # p50 and mean of 1 and 2 ms
    assert got[("send_start", "entry_got")] == (1.5, 1.5)
    assert got[("send_start", "send_end")] == (4.5, 4.5)  # the first send_end of each request
    assert got[("entry_start", "entry_sent")] == (9.0, 9.0)
    assert ("gen_execute", "gen_submitted") not in got  # a mark nobody wrote gives no line
