import math
import random

import pytest

from srlora_lab.experiments.stats import betainc, paired_interval, t_cdf, t_quantile


@pytest.mark.parametrize("df,q975", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                     (5, 2.571), (9, 2.262), (19, 2.093), (29, 2.045),
                                     (120, 1.980)])
def test_t_quantile_matches_printed_tables(df, q975):
    assert round(t_quantile(0.975, df), 3) == q975
    assert t_quantile(0.025, df) == pytest.approx(-t_quantile(0.975, df), abs=1e-12)


def test_t_quantile_inverts_the_cdf_and_nears_the_normal():
    for df in (1, 2.5, 7, 40):
        for p in (0.6, 0.9, 0.995):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_betainc_closed_forms():
    for x in (0.1, 0.37, 0.9):
        assert betainc(1.0, 1.0, x) == pytest.approx(x, abs=1e-14)  # uniform
        assert betainc(2.0, 1.0, x) == pytest.approx(x * x, abs=1e-14)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)),
                                                     abs=1e-12)


def test_paired_interval_hand_computed():
    # differences 1, 2, 3, 6: mean 3, sd sqrt(((-2)^2+1+0+9)/3) = sqrt(14/3); t(0.975, 3) = 3.18245
    a, b = [11.0, 12.0, 13.0, 16.0], [10.0, 10.0, 10.0, 10.0]
    out = paired_interval(a, b)
    sd = math.sqrt(14 / 3)
    half = 3.182446305284263 * sd / 2
    assert out["n"] == 4 and out["mean_diff"] == pytest.approx(3.0)
    assert out["sd"] == pytest.approx(sd, rel=1e-12)
    assert out["ci_low"] == pytest.approx(3 - half, rel=1e-9)
    assert out["ci_high"] == pytest.approx(3 + half, rel=1e-9)


def test_paired_interval_is_paired_not_pooled():
    rng = random.Random(0)
    base = [rng.gauss(0, 10) for _ in range(6)]  # large seed-to-seed spread, shared by a and b
    a, b = [x + 1.0 for x in base], base
    out = paired_interval(a, b)
    assert out["ci_low"] == pytest.approx(1.0) and out["ci_high"] == pytest.approx(1.0)


def test_paired_interval_edge_cases():
    one = paired_interval([2.0], [1.0])
    assert one["n"] == 1 and one["ci_low"] == -math.inf and one["ci_high"] == math.inf
    with pytest.raises(ValueError, match="length"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_interval([], [])
