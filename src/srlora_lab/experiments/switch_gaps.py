"""Where a switching method's training loss falls behind: the paired gap, interval by interval.

For two runs on the same seed (so the same base weights, head init and batches), the gap at step
``t`` is ``d_t = loss_a(t) - loss_b(t)`` (``train_loss[i]`` is the loss of step ``i + 1``; a
switch after step ``s`` first shows in ``train_loss[s]``). Cut at ``a``'s switch steps
``s_1 < ... < s_k`` (the fixed schedule gives every seed the same ones), each run gives:

* ``before``: the mean of ``d`` over ``[0, s_1)``, before any switch (zero in expectation when
  ``a`` is PiSSA until its first switch, as SRLoRA is);
* ``after``: the mean of ``d`` over ``[s_1, T)``: what the switches cost, in all;
* ``last``: the mean of ``d`` over ``[s_k, T)``, the last interval;
* ``jump``: the mean over switches of ``mean(d[s, s+w)) - mean(d[s-w, s))``, the change of the
  gap across a switch, ``w`` steps each side;
* ``intervals``: the mean of ``d`` over each of ``[0, s_1), [s_1, s_2), ..., [s_k, T)``: which
  switch opens the gap (given only when every seed switched at the same steps).

Reading them: ``before`` near zero and ``after`` above it say the switches open the gap; ``k``
switches that each cost ``jump`` for good would leave ``last`` near ``k * jump``; a ``last``
well below that says most of a switch's cost is made up before the next one (a transient, the
first-update jolt for one), and a ``last`` above it that loss is also lost between switches.
Each figure is a mean over paired seeds with its 95% t-interval
(:func:`stats.paired_interval`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .stats import paired_interval

WINDOW = 10
KEYS = ("before", "after", "last", "jump")


def segment_mean(x: Sequence[float], lo: int, hi: int) -> Optional[float]:
    """The mean of ``x[lo:hi]``, or None when it is empty."""
    seg = x[max(lo, 0) : max(hi, 0)]
    return sum(seg) / len(seg) if len(seg) else None


def switch_jumps(d: Sequence[float], cuts: Sequence[int], window: int) -> list[float]:
    """``mean(d[s, s+w)) - mean(d[s-w, s))`` for each cut ``s`` with ``w`` steps on both sides
    inside ``d`` (``w`` = ``window``)."""
    return [
        segment_mean(d, s, s + window) - segment_mean(d, s - window, s)
        for s in cuts
        if s - window >= 0 and s + window <= len(d)
    ]


def run_gaps(
    loss_a: Sequence[float], loss_b: Sequence[float], cuts: Sequence[int], window: int = WINDOW
) -> Optional[dict]:
    """One seed's ``before``, ``after``, ``last`` and ``jump`` (module docstring), or None when
    the runs differ in length, have no switch, or a figure is empty."""
    if len(loss_a) != len(loss_b) or not cuts:
        return None
    d = [a - b for a, b in zip(loss_a, loss_b)]
    cuts = sorted(cuts)
    jumps = switch_jumps(d, cuts, window)
    out = {
        "before": segment_mean(d, 0, cuts[0]),
        "after": segment_mean(d, cuts[0], len(d)),
        "last": segment_mean(d, cuts[-1], len(d)),
        "jump": sum(jumps) / len(jumps) if jumps else None,
    }
    if any(v is None for v in out.values()):
        return None
    bounds = [0, *cuts, len(d)]
    out["intervals"] = [segment_mean(d, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return out


def window_for(cuts: Sequence[int], steps: int) -> int:
    """``WINDOW`` steps, or a quarter of the shortest interval when that is smaller (at least 1)."""
    bounds = [0, *sorted(cuts), steps]
    shortest = min(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return max(1, min(WINDOW, shortest // 4))


def pair_gaps(recs_a: dict, recs_b: dict) -> Optional[dict]:
    """The paired gaps of method ``a`` against ``b`` over the seeds both finished (seed -> full
    run record, with ``train_loss`` and ``switch_steps``): for each of :data:`KEYS` the mean over
    seeds with its 95% interval, plus ``n``, ``window`` and the switch steps. None when no seed
    gives a figure (``a`` never switched, say)."""
    per, shapes = [], set()
    for s in sorted(set(recs_a) & set(recs_b)):
        a, b = recs_a[s], recs_b[s]
        cuts = tuple(sorted(a.get("switch_steps") or ()))
        if not cuts or not a.get("train_loss") or not b.get("train_loss"):
            continue
        w = window_for(cuts, len(a["train_loss"]))
        g = run_gaps(a["train_loss"], b["train_loss"], cuts, w)
        if g is not None:
            per.append(g)
            shapes.add((cuts, w))
    if not per:
        return None
    same = len(shapes) == 1  # the fixed schedule: one set of switch steps for every seed
    ((cuts, w),) = shapes if same else ((None, None),)
    out = {
        "n": len(per),
        "switch_steps": list(cuts) if same else None,
        "window": w if same else None,
    }
    for k in KEYS:
        out[k] = _interval([g[k] for g in per])
    # interval by interval, when the seeds share the schedule (and no interval is empty)
    out["intervals"] = (
        [_interval([g["intervals"][j] for g in per]) for j in range(len(cuts) + 1)]
        if same and all(None not in g["intervals"] for g in per)
        else None
    )
    return out


def _interval(v: list[float]) -> dict:
    """The mean of paired gaps ``v`` with its 95% t-interval."""
    ci = paired_interval(v, [0.0] * len(v))
    return {"mean": ci["mean_diff"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}
