"""Bad input to every `srlora` command: one line on stderr naming the problem, exit code 2, and
nothing written (no --out folder, no run.yaml); a bug still raises with its traceback. Tiny
random BERT and synthetic CSV (seconds, offline)."""

import json

import pytest
import yaml
from test_compare_cli import synthetic_csv, tiny_model

from srlora_lab.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    return {"model": tiny_model(str(d / "tiny-bert")), "csv": synthetic_csv(str(d / "d.csv"))}


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One finished `srlora train` run (4 steps; its final checkpoint) to export from."""
    d = tmp_path_factory.mktemp("trained")
    cfg = d / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            dict(
                model=assets["model"],
                dataset=assets["csv"],
                method="srlora",
                seed=0,
                lr=5e-3,
                steps=4,
                batch_size=8,
                r=4,
                r_target=8,
                eval_every=4,
                out=str(d / "run"),
                target_modules=["query", "value"],
            )
        )
    )
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return d / "run"


def compare_args(a, out, *extra):
    return [
        "compare",
        "--model",
        a["model"],
        "--dataset",
        a["csv"],
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--r",
        "4",
        "--r-target",
        "8",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--split-seed", "-1"], "--split-seed: must be >= 0"),
        (["--loss-threshold", "nan"], "--loss-threshold"),
        (["--loss-threshold", "inf"], "--loss-threshold"),
        (["--loss-threshold", "0"], "--loss-threshold: must be positive"),
        (["--lora-alpha", "nan"], "--lora-alpha"),
        (["--gamma", "nan"], "--gamma"),
        (["--threads", "0"], "--threads: must be >= 1"),
    ],
)
def test_compare_flag_refused_before_anything(assets, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    assert main(compare_args(assets, out, *extra)) == 2
    one_line_error(capsys, "srlora compare: error:", msg)
    assert not out.exists()


@pytest.mark.parametrize(
    "rows,msg",
    [
        (["[1, 2]", '{"text": "a good film", "label": 1}'], "row 1 is a JSON list"),
        (['{"text": "a good film", "label": 1}', '"just a string"'], "row 2 is a JSON str"),
    ],
)
def test_jsonl_row_that_is_not_an_object(assets, tmp_path, capsys, rows, msg):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    args = compare_args(assets, tmp_path / "o")
    args[args.index("--dataset") + 1] = str(data)
    assert main(args) == 2
    one_line_error(capsys, msg)
    assert not (tmp_path / "o").exists()


def test_refused_data_leaves_no_out_folder(assets, tmp_path, capsys):
    """The data and the model are checked before --out is created."""
    csv = tmp_path / "cols.csv"
    csv.write_text("sentence,label\na b,1\nc d,0\n")
    args = compare_args(assets, tmp_path / "deep" / "o")
    args[args.index("--dataset") + 1] = str(csv)
    assert main(args) == 2
    one_line_error(capsys, "missing column(s) ['text']")
    assert not (tmp_path / "deep").exists()


def test_compare_resume_with_corrupt_results(assets, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"runs": [')
    assert main(compare_args(assets, out, "--resume")) == 2
    one_line_error(capsys, "not valid JSON")
    assert (out / "results.json").read_text() == '{"runs": ['  # untouched


def write_train(path, assets, out, **kw):
    cfg = dict(
        model=assets["model"],
        dataset=assets["csv"],
        method="lora",
        seed=0,
        lr=5e-3,
        steps=4,
        batch_size=8,
        r=4,
        out=str(out),
    )
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"steps": "abc"}, "config: steps: expected an integer, got 'abc'"),
        ({"steps": 4.5}, "config: steps: expected an integer"),
        ({"steps": True}, "config: steps: expected an integer"),
        ({"gamma": "half"}, "config: gamma: expected a number"),
        ({"schedule": "cosine"}, "config: schedule: 'cosine' is not one of constant, linear"),
        ({"no_progress": "yes"}, "config: no_progress: expected true or false"),
        ({"split_seed": -1}, "--split-seed: must be >= 0"),
        ({"save_every": True}, "save_every: must be an integer >= 0"),
        ({"dataset": "MISSING.csv"}, "no such file"),
    ],
)
def test_train_yaml_value_refused_and_nothing_written(assets, tmp_path, capsys, kw, msg):
    out = tmp_path / "o"
    if kw.get("dataset") == "MISSING.csv":
        kw = {"dataset": str(tmp_path / "missing.csv")}
    assert (
        main(
            [
                "train",
                "--config",
                write_train(tmp_path / "c.yaml", assets, out, **kw),
                "--no-progress",
            ]
        )
        == 2
    )
    one_line_error(capsys, "srlora train: error:", msg)
    assert not out.exists()  # no folder, no run.yaml


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--rank", "0"], "--rank: must be >= 1"),
        (["--rank", "-3"], "--rank: must be >= 1"),
        (["--energy", "2"], "--energy: must be a fraction in (0, 1]"),
        (["--energy", "0"], "--energy: must be a fraction in (0, 1]"),
        (["--energy", "nan"], "--energy: must be a fraction in (0, 1]"),
        (["--rank", "2", "--energy", "0.9"], "not both"),
        (["--format", "merged", "--rank", "2"], "apply to --format peft"),
    ],
)
def test_export_flag_refused_before_anything(trained, tmp_path, capsys, extra, msg):
    out = tmp_path / "ad"
    assert main(["export", str(trained), "--out", str(out), *extra]) == 2
    one_line_error(capsys, "srlora export: error:", msg)
    assert not out.exists()


def test_export_out_is_an_existing_file(trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["export", str(trained), "--out", str(blocker)]) == 2
    one_line_error(capsys, "--out", "not a folder")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    "content,msg",
    [
        ("", "not valid JSON"),
        ('{"runs": [{"method": "lora"', "not valid JSON"),
        ("[1, 2]", "not a srlora results file"),
        ('{"runs": [], "config": {"bogus": 1}}', "not a srlora results file"),
        ('{"runs": [{"method": "lora"}], "config": {}}', "not a srlora results file"),
    ],
)
def test_export_corrupt_results_json(trained, tmp_path, capsys, content, msg):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(content)
    assert main(["export", str(run), "--out", str(tmp_path / "ad")]) == 2
    one_line_error(capsys, msg)
    assert not (tmp_path / "ad").exists()


def test_export_corrupt_checkpoint(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    res = json.loads((run / "results.json").read_text())
    res["config"]["out"] = str(run)
    (run / "results.json").write_text(json.dumps(res))
    (manifest,) = run.glob("checkpoints/*/step-*/manifest.json")
    manifest.write_text("{not json")
    assert main(["export", str(run), "--out", str(tmp_path / "ad")]) == 2
    one_line_error(capsys, "not valid JSON")
    assert not (tmp_path / "ad").exists()


def test_a_bug_keeps_its_traceback(assets, tmp_path, monkeypatch):
    """Only known input errors become exit 2; anything else propagates."""
    import srlora_lab.cli.compare as cc

    def boom(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cc, "prepare", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(compare_args(assets, tmp_path / "o"))


def test_compare_help_has_no_literal_percent_escape(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "95% intervals" in out


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--r-target", "0"], "--r-target must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--seq", "-2"], "--seq must be >= 1"),
        (["--json", "/etc/passwd/x.json"], "--json"),
    ],
)
def test_bench_flag_refused_before_anything(tmp_path, capsys, extra, msg):
    assert main(["bench", "--shape", "tiny", "--no-memory", *extra]) == 2
    one_line_error(capsys, "srlora bench: error:", msg)


def test_bench_json_is_a_folder(tmp_path, capsys):
    assert main(["bench", "--shape", "tiny", "--no-memory", "--json", str(tmp_path)]) == 2
    one_line_error(capsys, "is a folder")
