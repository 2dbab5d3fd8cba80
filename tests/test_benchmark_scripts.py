"""The before/after script of docs/benchmarks.md runs (tiny sizes): one process per version and
both interleaved in one process (here the tree against itself), with the op count."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_switch_time_runs_both_ways_and_counts_ops():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "switch_time.py"),
        "--hidden",
        "64",
        "--layers",
        "1",
        "--intermediate",
        "128",
        "--count-ops",
        "--before",
        str(ROOT / "src"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "llama: 7 modules, 14 switches, bfloat16" in text
    medians = re.findall(r"(before|this tree): switch_now\(\) median ([0-9.]+) ms", text)
    assert [k for k, _ in medians] == ["before", "this tree"]
    assert all(float(v) > 0 for _, v in medians)
    ratio = float(re.search(r"median of paired ratios: ([0-9.]+)", text).group(1))
    assert ratio > 0
    counts = re.findall(r"(before|this tree): one switch dispatches (\d+) ATen ops", text)
    assert len(counts) == 2 and counts[0][1] == counts[1][1]  # the same code twice
    assert int(counts[0][1]) >= 7 * 3  # at least a few ops per module: fuse, write, reset
