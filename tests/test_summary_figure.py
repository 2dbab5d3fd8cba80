"""`srlora summary`: the one-picture answer, built from a small synthetic study."""

import json

import pytest

from srlora_lab.cli import main
from srlora_lab.experiments import summary


def _verdict(task, a, b, mean_a, mean_b, half, mixed=False):
    d = mean_a - mean_b
    return {
        "task": task,
        "metric": "final_test_loss",
        "a": a,
        "b": b,
        "n": 5,
        "mean_a": mean_a,
        "mean_b": mean_b,
        "mean_diff": d,
        "ci_low": d - half,
        "ci_high": d + half,
        "complete": True,
        **({"mixed_sessions": True} if mixed else {}),
    }


@pytest.fixture
def studies(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "study.json").write_text(
        json.dumps(
            {
                "verdicts": [
                    _verdict("lm", "full", "lora", 3.2, 3.6, 0.02),
                    _verdict("lm", "srlora", "lora", 3.63, 3.6, 0.01),
                    _verdict("text", "lora", "pissa", 0.40, 0.42, 0.01),  # read from pissa's side
                    _verdict("text", "srlora-gradient", "lora", 0.5, 0.4, 0.1),  # not shown
                ]
            }
        )
    )
    two = tmp_path / "two"
    two.mkdir()
    (two / "study.json").write_text(
        json.dumps(
            {
                "verdicts": [
                    _verdict("lm", "srlora", "lora", 9.0, 3.6, 0.01),  # the first study named wins
                    _verdict("text", "srlora-rewarm", "lora", 0.38, 0.40, 0.01, mixed=True),
                ]
            }
        )
    )
    return one, two


def test_collect_reads_each_method_against_lora_in_percent(studies):
    data = summary.collect([str(s) for s in studies])
    assert set(data) == {"lm", "text"}
    assert data["lm"]["full"]["mean"] == pytest.approx(-0.4 / 3.6 * 100)
    assert data["lm"]["srlora"]["mean"] == pytest.approx(0.03 / 3.6 * 100)
    assert data["lm"]["srlora"]["study"] == "one"
    p = data["text"]["pissa"]  # pissa - lora = +0.02 of LoRA's 0.40
    assert p["mean"] == pytest.approx(5.0) and p["lo"] == pytest.approx(2.5)
    assert "srlora-gradient" not in data["text"] and data["text"]["srlora-rewarm"]["mixed"]


def test_the_command_writes_the_png_and_never_overwrites_unasked(studies, tmp_path, capsys):
    out = tmp_path / "fig" / "summary.png"
    assert main(["summary", *map(str, studies), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert main(["summary", *map(str, studies), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["summary", *map(str, studies), "--out", str(out), "--overwrite"]) == 0
    assert main(["summary", str(tmp_path), "--out", str(out), "--overwrite"]) == 2
