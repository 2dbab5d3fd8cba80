"""Issue 25, the `srlora export` cases: it never writes into a user's non-empty folder unless
--overwrite, never into the run's own folder, exports RUN_DIR's own checkpoint (not the `out`
recorded in results.json) and turns a damaged results.json into a one-line error, exit 2.
Each test states what 2f10a77 did."""

import json
import os
import shutil

import pytest
from test_compare_cli import synthetic_csv, tiny_model
from test_train_export_cli import write_config

from srlora_lab.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-nosilent")
    assets = {"model": tiny_model(str(d / "tiny-bert")), "csv": synthetic_csv(str(d / "d.csv"))}
    out = d / "run"
    assert (
        main(
            [
                "train",
                "--config",
                write_config(d / "a.yaml", assets, out, steps=8, eval_every=4),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def listing(folder):
    """Every file under ``folder`` (relative path -> bytes)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def test_export_refuses_a_non_empty_out_unless_overwrite(run, tmp_path, capsys):
    # 2f10a77: exit 0, the user's adapter_config.json overwritten
    user = tmp_path / "user"
    user.mkdir()
    (user / "adapter_config.json").write_text("mine")
    assert main(["export", str(run), "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert listing(user) == {"adapter_config.json": b"mine"}
    assert main(["export", str(run), "--out", str(user), "--overwrite"]) == 0
    assert (user / "adapter_config.json").read_text() != "mine"


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_export_refuses_the_runs_own_folder(run, fmt, capsys):
    # 2f10a77: --format merged --out RUN wrote config.json / model.safetensors into the run
    before = sorted(os.listdir(run))
    ck = run / "checkpoints"
    step = sorted((ck / os.listdir(ck)[0]).iterdir())[-1]
    link = run.with_name(f"link-to-run-{fmt}")
    if not link.exists():
        link.symlink_to(run)
    for out in (run, step, link, f"{run}/../{run.name}"):
        for extra in ([], ["--overwrite"]):
            assert main(["export", str(run), "--format", fmt, "--out", str(out), *extra]) == 2
            assert "run's own folder" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before


def test_export_uses_run_dirs_own_checkpoint(run, tmp_path, capsys):
    # 2f10a77: the checkpoint at the `out` recorded in results.json was exported: a copy with a
    # truncated checkpoint exported the original's (exit 0); a moved run could not be exported
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ckpts = sorted((copy / "checkpoints").rglob("model.safetensors"))
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])  # the copy's latest checkpoint, truncated
    assert main(["export", str(copy), "--out", str(tmp_path / "a")]) == 2
    assert str(copy) in capsys.readouterr().err
    ckpts[-1].write_bytes(data)
    moved = tmp_path / "moved"
    os.rename(copy, moved)  # the recorded `out` no longer names it
    hidden = run.with_name("run-hidden")
    os.rename(run, hidden)  # ... and the original is gone
    try:
        assert main(["export", str(moved), "--out", str(tmp_path / "b")]) == 0
    finally:
        os.rename(hidden, run)
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "field,value", [("lr", "0.005"), ("seed", "0"), ("method", 3), ("lr", True)]
)
def test_export_with_a_damaged_run_record_is_one_line_exit_2(run, tmp_path, capsys, field, value):
    # 2f10a77: a string lr gave a traceback (Unknown format code 'g' for object of type 'str')
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    res = json.loads((copy / "results.json").read_text())
    res["runs"][0][field] = value
    (copy / "results.json").write_text(json.dumps(res))
    assert main(["export", str(copy), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"runs[...].{field}" in err
    assert not (tmp_path / "o").exists()


def test_export_into_an_empty_or_new_folder_needs_no_flag(run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "a" / "b")]) == 0
    assert "model.safetensors" in os.listdir(tmp_path / "a" / "b")


def test_train_and_compare_refuse_an_out_holding_a_run(run, capsys):
    # beyond the cases, the same rule: 2f10a77 overwrote a finished run's results.json (and
    # mixed new checkpoints into its folder) when train/compare were pointed at it again
    before = listing(run)
    assert main(["train", "--config", str(run.parent / "a.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert (
        main(
            [
                "compare",
                "--model",
                str(run.parent / "tiny-bert"),
                "--dataset",
                str(run.parent / "d.csv"),
                "--steps",
                "4",
                "--batch-size",
                "8",
                "--r",
                "4",
                "--r-target",
                "12",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "already holds a run" in capsys.readouterr().err
    assert listing(run) == before
