"""The paired training-loss gaps around switches (experiments/switch_gaps.py), against hand-built
loss curves whose gaps are known exactly."""

import math

import pytest
import torch

from srlora_lab.experiments.stats import paired_interval
from srlora_lab.experiments.switch_gaps import (
    pair_gaps,
    run_gaps,
    segment_mean,
    switch_jumps,
    window_for,
)


def test_segment_mean_and_jumps_by_hand():
    d = [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
    assert segment_mean(d, 1, 3) == 1.5 and segment_mean(d, 5, 5) is None
    # a cut at 4 with 2 steps each side: mean(10, 11) - mean(2, 3); cuts too near an end skipped
    assert switch_jumps(d, [4, 1, 7], 2) == [10.5 - 2.5]
    assert window_for([40, 70], 100) == 7 and window_for([50], 200) == 10
    assert window_for([1], 3) == 1


def test_run_gaps_of_a_staircase_on_noise():
    """a = b + 0 before the first switch, then + c * (switches so far): every switch costs c for
    good, so jump = c, last = k c, after = the step-weighted mean; on fresh noise in b."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    T, cuts, c = 120, [30, 60, 90], 0.02
    b = (1.0 + 0.3 * torch.rand(T, generator=g)).tolist()
    level = [c * sum(t >= s for s in cuts) for t in range(T)]
    a = [x + y for x, y in zip(b, level)]
    got = run_gaps(a, b, cuts, window=5)
    assert got["before"] == pytest.approx(0.0, abs=1e-12)
    assert got["jump"] == pytest.approx(c, abs=1e-12)
    assert got["last"] == pytest.approx(3 * c, abs=1e-12)
    assert got["after"] == pytest.approx((c + 2 * c + 3 * c) / 3, abs=1e-12)
    assert got["intervals"] == pytest.approx([0.0, c, 2 * c, 3 * c], abs=1e-12)
    # a transient: each switch costs c for 5 steps only, so jump = c and last ~ 0
    spike = [c if any(s <= t < s + 5 for s in cuts) else 0.0 for t in range(T)]
    got = run_gaps([x + y for x, y in zip(b, spike)], b, cuts, window=5)
    assert got["jump"] == pytest.approx(c, abs=1e-12)
    assert got["last"] == pytest.approx(c * 5 / 30, abs=1e-12)
    assert run_gaps(a, b[:-1], cuts) is None and run_gaps(a, b, []) is None


def test_pair_gaps_pairs_seeds_and_gives_t_intervals():
    T, cuts = 80, [20, 40, 60]
    base = {s: [1.0 + 0.1 * math.sin(t + s) for t in range(T)] for s in range(4)}
    shift = {0: 0.01, 1: 0.03, 2: 0.02, 3: 0.05}
    a = {
        s: {
            "train_loss": [x + (shift[s] if t >= 20 else 0.0) for t, x in enumerate(base[s])],
            "switch_steps": cuts,
        }
        for s in (0, 1, 2, 3)
    }
    b = {s: {"train_loss": base[s]} for s in (0, 1, 2)}  # seed 3: a only, not paired
    got = pair_gaps(a, b)
    want = paired_interval([shift[s] for s in (0, 1, 2)], [0.0] * 3)
    assert got["n"] == 3 and got["switch_steps"] == cuts and got["window"] == 5
    for k in ("after", "last"):
        assert got[k]["mean"] == pytest.approx(want["mean_diff"], abs=1e-12)
        assert got[k]["ci_low"] == pytest.approx(want["ci_low"], abs=1e-12)
        assert got[k]["ci_high"] == pytest.approx(want["ci_high"], abs=1e-12)
    assert got["before"]["mean"] == pytest.approx(0.0, abs=1e-12)
    # jump: the shift at step 20, none at 40 and 60
    assert got["jump"]["mean"] == pytest.approx(want["mean_diff"] / 3, abs=1e-12)
    # by interval: nothing before step 20, the shift in each of the three after it
    assert got["intervals"][0]["mean"] == pytest.approx(0.0, abs=1e-12)
    for c in got["intervals"][1:]:
        assert c["mean"] == pytest.approx(want["mean_diff"], abs=1e-12)
        assert c["ci_high"] == pytest.approx(want["ci_high"], abs=1e-12)
    from srlora_lab.experiments.study_report import switch_gap_table

    md = switch_gap_table(
        {"switch_gaps": [dict(got, task="t", a="x", b="y", lr_a=1e-3, lr_b=1e-3)]}, "t"
    )
    assert "| a | b | from 0 | from 20 | from 40 | from 60 |" in md
    assert "| x | y | +0.000 [" in md.splitlines()[-1]
    no_switch = {s: {"train_loss": base[s], "switch_steps": []} for s in (0, 1, 2)}
    assert pair_gaps(no_switch, b) is None


def test_seeds_that_switched_at_different_steps_still_pair():
    """The adaptive schedule: each seed is cut at its own switches; the shared steps and window
    are then None, and the report's table says how the window was chosen."""
    from srlora_lab.experiments.study_report import switch_gap_table

    T = 60
    a = {
        0: {"train_loss": [1.0] * 20 + [1.1] * 40, "switch_steps": [20, 40]},
        1: {"train_loss": [1.0] * 30 + [1.3] * 30, "switch_steps": [30]},
    }
    b = {s: {"train_loss": [1.0] * T} for s in (0, 1)}
    got = pair_gaps(a, b)
    assert got["n"] == 2 and got["switch_steps"] is None and got["window"] is None
    assert got["intervals"] is None  # no shared intervals to line up
    assert got["after"]["mean"] == pytest.approx(0.2, abs=1e-12)
    assert got["jump"]["mean"] == pytest.approx((0.1 / 2 + 0.3) / 2, abs=1e-12)
    md = switch_gap_table(
        {"switch_gaps": [dict(got, task="t", a="x", b="y", lr_a=1e-3, lr_b=1e-3)]}, "t"
    )
    assert "or a quarter of the shortest interval" in md
    assert "| x | y | 0.001, 0.001 | 2 | +0.000 [" in md
