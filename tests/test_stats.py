import math
import random

import pytest

from srlora_lab.experiments.stats import betainc, paired_interval, t_cdf, t_quantile


@pytest.mark.parametrize(
    "df,q975",
    [
        (1, 12.706),
        (2, 4.303),
        (3, 3.182),
        (4, 2.776),
        (5, 2.571),
        (9, 2.262),
        (19, 2.093),
        (29, 2.045),
        (120, 1.980),
    ],
)
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
        assert betainc(0.5, 0.5, x) == pytest.approx(
            2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12
        )


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


def test_paired_p_against_a_printed_value_and_its_edges():
    from srlora_lab.experiments.stats import paired_p

    # d = 1..5: t = 3 / (1.5811 / sqrt 5) = 4.2426, df 4: two-sided p = 0.013236 (t tables)
    assert paired_p([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]) == pytest.approx(0.013236, abs=2e-6)
    assert paired_p([1.0, 1.0], [0.0, 0.0]) == 0.0 and paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert paired_p([1.0], [0.0]) != paired_p([1.0], [0.0])  # nan with one pair


def test_holm_by_hand():
    from srlora_lab.experiments.stats import holm

    # sorted 0.005 x4, 0.01 x3, 0.03 x2 (then the running max), 0.04 x1 -> max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = holm([0.2, float("nan"), 0.01])  # nan is left out of the family (m = 2)
    assert got[0] == pytest.approx(0.2) and got[2] == pytest.approx(0.02) and got[1] != got[1]
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 capped at 1; monotone


def test_bootstrap_ratio_is_the_ratio_of_means_with_a_deterministic_interval():
    from srlora_lab.experiments.stats import bootstrap_ratio

    num, den = [-0.1, -0.12, -0.08, -0.11, -0.09], [-0.3, -0.31, -0.29, -0.3, -0.32]
    a = bootstrap_ratio(num, den, reps=2000)
    assert a["ratio"] == pytest.approx(sum(num) / sum(den))
    assert a["ci_low"] < a["ratio"] < a["ci_high"] and a == bootstrap_ratio(num, den, reps=2000)
    same = bootstrap_ratio([0.5] * 4, [1.0] * 4, reps=100)
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.5)


def test_compare_says_when_no_paired_interval_excludes_zero():
    from srlora_lab.experiments.report import distinguishable

    iv = lambda lo, hi: {"ci_low": lo, "ci_high": hi}
    flat = {
        "methods": {
            "pissa": {
                "accuracy": iv(-0.05, 0.03),
                "test_loss": iv(-0.1, 0.2),
                "wall_time_s": iv(1.0, 2.0),
            }
        }
    }
    assert not distinguishable(flat)  # wall time is not a quality metric
    flat["methods"]["srlora"] = {"accuracy": iv(-0.05, -0.01)}
    assert distinguishable(flat)


def test_headroom_fraction_only_where_full_fine_tuning_is_ahead():
    """(method - LoRA) / H is reported only where H's interval shows full fine-tuning ahead (below
    zero for a loss, above for accuracy); over an H that holds zero or points the other way it
    was a ratio of noise (bbc-lm, two seeds: -4.3 [-5.8, -3.2] from H = 0.004 [-0.005, 0.014])."""
    from srlora_lab.experiments.family import headroom

    rng = random.Random(7)
    seeds = list(range(5))
    lora = {s: 3.6 + rng.gauss(0, 0.01) for s in seeds}

    def run(full_shift):
        vals = {
            "full": {s: (lora[s] + full_shift + rng.gauss(0, 0.002), "fp") for s in seeds},
            "lora": {s: (lora[s], "fp") for s in seeds},
            "big": {s: (lora[s] + full_shift / 2 + rng.gauss(0, 0.002), "fp") for s in seeds},
        }
        spec = {"full": "full", "lora": "lora", "methods": ["big"], "metrics": ["final_test_loss"]}
        return headroom("t", spec, lambda m, k: vals[m])["metrics"]["final_test_loss"]

    ahead = run(-0.3)  # full fine-tuning 0.3 nats better: a headroom, half of it recovered
    assert ahead["H"]["full_ahead"] and ahead["H"]["ci_high"] < 0
    (m,) = ahead["methods"]
    assert abs(m["fraction"]["ratio"] - 0.5) < 0.05
    assert m["fraction"]["ci_low"] < m["fraction"]["ratio"] < m["fraction"]["ci_high"]
    for shift in (0.3, 0.0):  # full behind, or level: no headroom, no fraction
        e = run(shift)
        assert not e["H"]["full_ahead"]
        (m,) = e["methods"]
        assert m["fraction"] is None and m["vs_lora"]["n"] == 5
