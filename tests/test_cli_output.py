"""What `srlora compare` shows: no PEFT/transformers deprecation or load-report noise (the
piped-log check rides on test_compare_cli's end-to-end run), the table's wall-time median and
range and its paired differences against LoRA, and plots that say what their bands are."""

import math

import numpy as np
import pytest
from test_compare_cli import synthetic_csv, tiny_model

from srlora_lab.experiments import report
from srlora_lab.experiments.stats import t_quantile


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """The tiny BERT saved WITHOUT its classifier (like a real pretrained encoder) + data."""
    import torch
    from transformers import BertModel

    d = tmp_path_factory.mktemp("headless")
    full = tiny_model(str(d / "full"))
    path = str(d / "encoder")
    from transformers import BertConfig, BertTokenizer

    BertTokenizer.from_pretrained(full).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(full)).save_pretrained(path)
    return {"model": path, "csv": synthetic_csv(str(d / "d.csv"))}


def test_wrap_raises_no_peft_deprecation_warning():
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` inside get_peft_model:
    srlora.wrap filters exactly that warning (other FutureWarnings still show)."""
    import warnings

    import srlora
    from conftest import tiny_bert

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        srlora.wrap(
            tiny_bert(),
            srlora.SRLoRAConfig(r=2, r_target=4, total_steps=10, target_modules=["query", "value"]),
        )
        warnings.warn("a FutureWarning of the user's own", FutureWarning)
    texts = [str(w.message) for w in seen]
    assert not any("is_gradient_checkpointing" in t for t in texts), texts
    assert "a FutureWarning of the user's own" in texts


def test_missing_weights_outside_the_head_are_still_reported(headless, tmp_path, capfd):
    import shutil

    from safetensors.torch import load_file, save_file

    from srlora_lab.experiments.models import load_model

    broken = tmp_path / "broken"
    shutil.copytree(headless["model"], broken)
    weights = load_file(str(broken / "model.safetensors"))
    lost = next(k for k in weights if "layer.1.attention.self.query.weight" in k)
    del weights[lost]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    load_model(str(broken), "text", 2)
    err = capfd.readouterr().err
    assert "srlora: warning" in err and "query.weight" in err
    assert "classifier" not in err  # the head is new by design: not reported
    load_model(headless["model"], "text", 2)
    assert capfd.readouterr().err == ""


def _run(method, seed, lr, acc, loss, wall, val=None, switches=()):
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "final_accuracy": acc,
        "val_accuracy": val,
        "train_loss": loss,
        "wall_time_s": wall,
        "num_switches": len(switches),
        "switch_steps": list(switches),
        "eval_curve": [{"step": s, "accuracy": acc} for s in (2, 4, 6, 8)],
    }


def _results():
    rng = np.random.default_rng(0)
    loss = lambda: list(np.linspace(1.0, 0.3, 8) + rng.uniform(0, 0.05, 8))
    runs = []
    for seed, (a_lora, a_sr, a_pi) in enumerate(
        [(0.70, 0.72, 0.69), (0.60, 0.64, 0.61), (0.80, 0.79, None)]
    ):
        runs.append(_run("lora", seed, 1e-3, a_lora, loss(), 10.0 + seed, val=0.7))
        runs.append(_run("lora", seed, 1e-2, 0.1, loss(), 5.0, val=0.1))  # not selected
        runs.append(
            _run(
                "srlora",
                seed,
                3e-4,
                a_sr,
                loss(),
                [12.0, 11.0, 300.0][seed],
                val=0.7,
                switches=(3, 6),
            )
        )
        if a_pi is not None:  # pissa has only seeds 0 and 1
            runs.append(_run("pissa", seed, 1e-3, a_pi, loss(), 9.0, val=0.7))
    return {
        "runs": runs,
        "best_lr": {"lora": 1e-3, "srlora": 3e-4, "pissa": 1e-3},
        "config": {"task": "t", "methods": ["lora", "pissa", "srlora"], "eval_size": 10},
    }


def test_paired_differences_against_lora():
    res = _results()
    p = report.paired_vs_lora(res)
    assert p["seeds"] == [0, 1]  # only the seeds every method has
    sr = p["methods"]["srlora"]["accuracy"]
    # differences 0.02 and 0.04: mean 0.03, sd 0.01*sqrt(2), half = t(0.975, 1) * sd / sqrt(2)
    half = t_quantile(0.975, 1) * 0.01
    assert sr["n"] == 2 and math.isclose(sr["mean_diff"], 0.03, abs_tol=1e-12)
    assert math.isclose(sr["ci_low"], 0.03 - half, rel_tol=1e-9)
    assert math.isclose(sr["ci_high"], 0.03 + half, rel_tol=1e-9)
    assert abs(half - 0.127062) < 1e-5  # 12.7062 from a printed t table, times 0.01
    assert p["methods"]["srlora"]["lr"] == 3e-4  # at the selected lr, not lora's 1e-2 runs
    pi = p["methods"]["pissa"]["accuracy"]
    assert math.isclose(pi["mean_diff"], (-0.01 + 0.01) / 2, abs_tol=1e-12)
    wall = p["methods"]["srlora"]["wall_time_s"]
    assert math.isclose(wall["mean_diff"], ((12 - 10) + (11 - 11)) / 2)
    auc = p["methods"]["srlora"]["loss_auc"]
    by = {(r["method"], r["seed"], r["lr"]): r for r in res["runs"]}
    d = [
        np.mean(by["srlora", s, 3e-4]["train_loss"]) - np.mean(by["lora", s, 1e-3]["train_loss"])
        for s in (0, 1)
    ]
    assert math.isclose(auc["mean_diff"], np.mean(d), rel_tol=1e-12)
    # one shared seed: no interval (null in results.json: strict JSON has no Infinity)
    one = report.paired_vs_lora({**res, "runs": [r for r in res["runs"] if r["seed"] == 0]})
    assert one["methods"]["srlora"]["accuracy"]["ci_low"] is None
    assert (
        report.paired_vs_lora({**res, "runs": [r for r in res["runs"] if r["method"] != "lora"]})
        is None
    )


def test_table_shows_wall_median_range_and_paired_block():
    text = report.format_report(_results())
    assert "wall s: median (range)" in text
    assert "12.0 (11.0-300.0)" in text  # srlora's wall times 12, 11, 300: median (range)
    assert "300.0 ±" not in text and "107.7 ±" not in text
    block = text.split("paired difference against lora")[1]
    assert "seeds 0,1" in block
    half = t_quantile(0.975, 1) * 0.01 * 100
    sr_line = next(l for l in block.splitlines() if l.startswith("srlora"))
    assert f"+3.0 [{3 - half:+.1f}, {3 + half:+.1f}]" in sr_line


def test_plots_explain_the_band_and_mark_switches():
    from srlora_lab.experiments import plots

    res = _results()
    for fig in (plots.loss_figure(res), plots.accuracy_figure(res)):
        ax = fig.axes[0]
        assert any("band = min..max over seeds" in t.get_text() for t in ax.texts)
        vlines = sorted({round(l.get_xdata()[0]) for l in ax.lines if l.get_linestyle() == ":"})
        assert vlines == [3, 6]
        plots._plt().close(fig)


def test_default_eval_interval_gives_ten_points():
    from srlora_lab.experiments.tasks import CUSTOM_DEFAULTS, TASKS

    # the classification tasks; bbc-lm (SmolLM2, one eval of its 16 blocks costs about two
    # training steps on this CPU) keeps two points per run (docs/compare.md)
    for d in [t.defaults for t in TASKS.values() if t.kind != "lm"] + [CUSTOM_DEFAULTS]:
        assert d["steps"] // d["eval_every"] >= 10, d
