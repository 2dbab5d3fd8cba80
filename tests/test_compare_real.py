"""`srlora compare` on the real offline assets (slow: run with -m slow)."""

import json
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _compare(tmp_path, *args, name="out"):
    out = tmp_path / name  # a new folder per run: compare refuses one that holds a run
    proc = subprocess.run(
        [sys.executable, "-m", "srlora", "compare", "--out", str(out), "--no-progress", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout, out


@pytest.mark.slow
def test_default_task_short(tmp_path):
    """The default task and methods with their default learning rates, shortened."""
    res, stdout, out = _compare(
        tmp_path, "--seeds", "0", "--steps", "40", "--max-test", "300", "--eval-every", "20"
    )
    assert res["config"]["task"] == "rt-polarity"
    assert [r["method"] for r in res["runs"]] == ["lora", "pissa", "srlora"]
    assert "all-MiniLM-L6-v2" in res["model"]["name"]
    assert res["split"]["duplicates_dropped"] > 0 and res["split"]["test"] == 300
    for r in res["runs"]:
        assert len(r["train_loss"]) == 40 and 0.4 < r["final_accuracy"] <= 1.0
    sr = res["runs"][2]
    assert sr["num_switches"] >= 3 and len(sr["switch_steps"]) == sr["num_switches"]
    assert all((out / p).exists() for p in ("loss.png", "accuracy.png", "importance.png"))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mnist", "fashion-mnist"])
def test_image_tasks_short(tmp_path, task):
    res, _, out = _compare(
        tmp_path,
        "--task",
        task,
        "--seeds",
        "0",
        "--steps",
        "30",
        "--max-test",
        "300",
        "--eval-every",
        "15",
        "--methods",
        "lora,srlora",
    )
    lora, sr = res["runs"]
    assert res["model"]["trained_head"] == ["_fc"] and len(res["model"]["target_modules"]) == 32
    assert sr["num_switches"] >= 2
    assert lora["final_accuracy"] > 0.3 and sr["final_accuracy"] > 0.3  # 10 classes: chance 0.1


@pytest.mark.slow
def test_bbc_and_subjectivity_load_and_train(tmp_path):
    for task in ("bbc-news", "rt-subjectivity"):
        res, _, _ = _compare(
            tmp_path,
            "--task",
            task,
            "--seeds",
            "0",
            "--steps",
            "10",
            "--max-test",
            "100",
            "--methods",
            "srlora",
            "--max-len",
            "64",
            name=task,
        )
        assert res["runs"][0]["num_switches"] >= 1
