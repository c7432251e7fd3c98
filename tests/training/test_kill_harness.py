"""The kill harness (benchmarks/kill_harness.py) in small: 3 SIGKILLs of `lorakit train --save-every 1` at
seeded random moments, `--resume` after each, and the final adapter bit-identical to an uninterrupted run's.
`make faults` runs it with 50 kills."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kill_harness  # noqa: E402


def test_three_kills_then_resume_end_bit_identical(tmp_path):
    counts = kill_harness.kill_trials(kills=3, seed=1, steps=3, workdir=tmp_path)
    assert counts["kills"] == 3
    assert counts["finished"] >= 1 and counts["identical"] == counts["finished"]
