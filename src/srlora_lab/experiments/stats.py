"""Paired-seed statistics: the Student-t quantile and the paired t-interval, without scipy.

``t_quantile(p, df)`` inverts the Student-t CDF, written through the regularized incomplete beta
function ``I_x(a, b)`` (Lentz's continued fraction, Numerical Recipes 6.4) and bisection; it
matches printed t tables to their 3 decimals (tests/test_stats.py).
"""

from __future__ import annotations

import math
from typing import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)`` for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t CDF with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):  # bisection to float resolution
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_interval(a: Sequence[float], b: Sequence[float], conf: float = 0.95) -> dict:
    """Mean of the paired differences ``a[i] - b[i]`` with its ``conf`` t-interval.

    Returns ``n``, ``mean_diff``, ``sd`` (sample standard deviation of the differences),
    ``ci_low``, ``ci_high``. With one pair the interval is unbounded (``-inf, inf``); with zero
    spread it is the point.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("paired_interval needs at least one pair")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {
            "n": n,
            "mean_diff": mean,
            "sd": float("nan"),
            "ci_low": -math.inf,
            "ci_high": math.inf,
        }
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(0.5 + conf / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean_diff": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p value of the paired t-test of ``mean(a - b) = 0`` (nan with under 2 pairs;
    0 when every difference is the same nonzero number, 1 when all are zero)."""
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return float("nan")
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = abs(mean) / (sd / math.sqrt(n))
    return min(1.0, 2.0 * (1.0 - t_cdf(t, n - 1)))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the order given: with the p values sorted
    ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` (Holm 1979). It controls the
    family-wise error rate at level alpha when ``adj <= alpha`` is read as significant. A nan
    p (no estimate) stays nan and does not count in m."""
    idx = sorted((i for i, p in enumerate(ps) if p == p), key=lambda i: ps[i])
    m, out, running = len(idx), [float("nan")] * len(ps), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], reps: int = 10000, conf: float = 0.95, seed: int = 0
) -> dict:
    """``mean(num) / mean(den)`` with a paired percentile-bootstrap interval: seeds resampled
    with replacement, the same draw for numerator and denominator (``num[i]``, ``den[i]`` are one
    seed's paired differences). Draws whose denominator mean is 0 are dropped. Deterministic for
    a given ``seed``."""
    import random

    if len(num) != len(den) or not num:
        raise ValueError("bootstrap_ratio needs equal, non-empty samples")
    n = len(num)
    md = sum(den) / n
    est = (sum(num) / n) / md if md != 0 else float("nan")
    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        pick = [rng.randrange(n) for _ in range(n)]
        d = sum(den[i] for i in pick)
        if d != 0:
            draws.append(sum(num[i] for i in pick) / d)
    if not draws:
        return {"ratio": est, "ci_low": float("nan"), "ci_high": float("nan"), "reps": 0}
    draws.sort()
    lo = draws[int(math.floor((1 - conf) / 2 * (len(draws) - 1)))]
    hi = draws[int(math.ceil((1 + conf) / 2 * (len(draws) - 1)))]
    return {"ratio": est, "ci_low": lo, "ci_high": hi, "reps": len(draws)}
