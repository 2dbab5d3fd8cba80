"""A study's records and folder: full fine-tuning as a method, compact and checksummed records,
one lr per file, one process per folder, one machine per comparison, and the declared family.

Each test here failed on c7bf1de (no `full` method, records without checksum or fingerprint,
`lr:g` file names, no lock)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from srlora_lab.cli import main
from srlora_lab.experiments import records, study, study_spec
from srlora_lab.experiments.fingerprint import machine_fingerprint
from test_compare_cli import ENV, synthetic_csv, tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    tiny_model(str(d / "tiny-bert"))
    synthetic_csv(str(d / "d.csv"))
    return d


def _spec(d, **over):
    spec = {
        "name": "tiny-full",
        "smoke": True,
        "lrs": [1e-2],
        "selection": {"seeds": [0]},
        "final": {"seeds": [0, 1]},
        "methods": [{"name": "full", "method": "full", "lrs": [1e-3]}, "lora", "srlora"],
        "pairs": [["full", "lora"], ["srlora", "lora"]],
        "headroom": [{"full": "full", "lora": "lora", "methods": ["srlora"]}],
        "confirmatory": [
            {
                "task": "tiny",
                "a": "full",
                "b": "lora",
                "metric": "final_test_loss",
                "prediction": "full better",
            }
        ],
        "tasks": [
            {
                "name": "tiny",
                "dataset": str(d / "d.csv"),
                "model": str(d / "tiny-bert"),
                "steps": 8,
                "batch_size": 8,
                "r": 4,
                "r_target": 12,
                "eval_every": 2,
                "eval_size": 16,
                "max_val": 24,
                "max_test": 24,
                "target_modules": ["query", "value"],
            }
        ],
    }
    spec.update(over)
    path = d / f"spec-{len(os.listdir(d))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "study"
    assert (
        main(["study", str(_spec(tiny_dir)), "--out", str(out), "--no-progress", "--threads", "1"])
        == 0
    )
    return out


def _files(out):
    return sorted(
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(out, "runs"))
        for f in fs
        if f.endswith(".json")
    )


def test_full_fine_tuning_trains_every_weight_and_records_its_change(finished):
    recs = {json.load(open(f))["name"]: json.load(open(f)) for f in _files(finished)}
    full, lora = recs["full"], recs["lora"]
    # every parameter of the 2-layer BERT is trainable, far more than LoRA's
    assert full["trainable_params"] > 10 * lora["trainable_params"]
    assert full["num_switches"] == 0 and full["train_loss"] and not full["failed"]
    # the spectrum of W_final - W0 of the modules LoRA targets (2 layers x query, value)
    assert full["adapted_modules"] == 4
    assert full["diagnostics"]["summary"]["method"] == "full"
    assert full["diagnostics"]["summary"]["erank_mean"] > 1.0
    # the same batches and evaluation: identical curve steps
    assert [c["step"] for c in full["eval_curve"]] == [c["step"] for c in lora["eval_curve"]]


def test_records_are_compact_sealed_and_fingerprinted(finished):
    for f in _files(finished):
        rec = json.load(open(f))
        assert "switches" not in rec and "spectra" not in rec["diagnostics"]
        assert "pairs" not in rec["diagnostics"] and isinstance(rec["diagnostics"]["erank"], list)
        assert rec["sha256"] == records.checksum(rec)
        assert rec["fingerprint"]["id"] == machine_fingerprint(threads=1)["id"]


def test_summary_has_the_declared_family_with_holm_and_the_headroom(finished):
    s = json.load(open(finished / "study.json"))
    (c,) = s["confirmatory"]
    assert c["p"] is not None and c["p_holm"] == pytest.approx(c["p"])  # a family of one
    assert c["finding"] in ("better", "worse", "no difference shown")
    (h,) = s["headroom"]
    e = h["metrics"]["final_test_loss"]
    assert e["H"]["n"] == 2
    (m,) = e["methods"]
    assert m["method"] == "srlora" and "fraction" in m
    md = (finished / "verdicts.md").read_text()
    assert "Confirmatory comparisons" in md and "exploratory" in md and "Headroom" in md


def test_a_damaged_or_edited_record_is_named_by_report_and_rerun_by_resume(
    finished, tmp_path, capsys
):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    files = _files(out)
    # a hand edit: the checksum no longer matches
    rec = json.load(open(files[0]))
    rec["final_accuracy"] = 0.99
    json.dump(rec, open(files[0], "w"))
    # a truncation
    text = open(files[1]).read()
    open(files[1], "w").write(text[: len(text) // 2])
    spec = sorted(_TINY[0].glob("spec-*.yaml"))[0]  # the spec `finished` was made from
    assert main(["study", str(spec), "--out", str(out), "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (
        "changed since it was written" in err[0] or "not valid JSON" in err[0]
    )
    assert (
        main(["study", str(spec), "--out", str(out), "--resume", "--no-progress", "--threads", "1"])
        == 0
    )
    outtxt = capsys.readouterr().out
    assert outtxt.count("run again") == 2
    assert os.path.exists(files[0] + ".damaged") and os.path.exists(files[1] + ".damaged")
    assert json.load(open(files[0]))["sha256"] == records.checksum(json.load(open(files[0])))


_TINY = []  # the module's tiny_dir, for tests that need the spec `finished` was made from


@pytest.fixture(autouse=True)
def _remember(tiny_dir):
    _TINY[:] = [tiny_dir]


def test_two_lrs_never_share_a_file():
    a = study.run_file("o", "t", "m", 0.001, 8, 0)
    b = study.run_file("o", "t", "m", 0.0010000001, 8, 0)
    assert a != b
    # the grids in use keep their old names (committed studies still resolve)
    for lr, text in ((3e-4, "0.0003"), (1e-3, "0.001"), (3e-5, "3e-05"), (1e-4, "0.0001")):
        assert study.run_file("o", "t", "m", lr, 8, 0).endswith(f"lr={text}/steps=8/seed=0.json")


def test_one_process_per_study_folder_and_a_killed_holder_frees_it(tmp_path):
    folder = tmp_path / "s"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from srlora_lab.experiments.records import "
            "StudyLock; StudyLock(sys.argv[1]).acquire(); print('held', flush=True); "
            "time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(records.RecordError, match=f"pid {holder.pid}"):
        records.StudyLock(str(folder)).acquire()
    holder.kill()
    holder.wait()
    with records.StudyLock(str(folder)):  # SIGKILL left nothing stuck
        pass


def test_a_second_study_on_a_held_folder_exits_2(tiny_dir, tmp_path, capsys):
    out = tmp_path / "held"
    lock = records.StudyLock(str(out)).acquire()
    try:
        assert main(["study", str(_spec(tiny_dir)), "--out", str(out), "--no-progress"]) == 2
        assert "another srlora study is using this folder" in capsys.readouterr().err
    finally:
        lock.release()


def test_resume_and_reuse_never_mix_machines(finished, tiny_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "foreign"
    shutil.copytree(finished, out)
    f = _files(out)[0]
    rec = json.load(open(f))
    rec["fingerprint"] = dict(rec["fingerprint"], cpu="another CPU", id="0123456789ab")
    json.dump(records.seal(rec), open(f, "w"))
    spec = sorted(tiny_dir.glob("spec-*.yaml"))[0]
    assert (
        main(["study", str(spec), "--out", str(out), "--resume", "--no-progress", "--threads", "1"])
        == 2
    )
    assert "made on another machine" in capsys.readouterr().err
    # --reuse copies only this machine's runs
    new = tmp_path / "new"
    got = study.reuse_runs(
        study_spec.load(str(spec)),
        str(new),
        str(out),
        fingerprint=machine_fingerprint(threads=1)["id"],
    )
    assert got["skipped"].get("made on another machine", 0) >= 1
    assert not os.path.exists(new / os.path.relpath(f, out))
    assert got["copied"] == len(_files(out)) - 1


def test_full_takes_no_adapter_settings(tiny_dir):
    with pytest.raises(study_spec.SpecError, match=r"methods\[0\].r: method 'full' has no adapter"):
        study_spec.parse(
            yaml.safe_load(
                _spec(
                    tiny_dir, methods=[{"name": "full", "method": "full", "r": 4}, "lora"]
                ).read_text()
            )
        )


def test_compare_runs_full_and_refuses_what_it_cannot_do(tiny_dir, tmp_path, capsys):
    common = [
        "compare",
        "--model",
        str(tiny_dir / "tiny-bert"),
        "--dataset",
        str(tiny_dir / "d.csv"),
        "--steps",
        "4",
        "--seeds",
        "0,1",
        "--no-progress",
        "--target-modules",
        "query,value",
        "--lr",
        "1e-2,full=1e-3",
    ]
    out = tmp_path / "cmp"
    assert main(common + ["--methods", "lora,full", "--out", str(out)]) == 0
    runs = json.load(open(out / "results.json"))["runs"]
    assert {r["method"] for r in runs} == {"lora", "full"}
    capsys.readouterr()
    assert main(["export", str(out), "--run", "full,0,0.001", "--out", str(tmp_path / "e")]) == 2
    assert "no adapter to export" in capsys.readouterr().err
    assert (
        main(
            common + ["--methods", "lora,full", "--save-every", "2", "--out", str(tmp_path / "c2")]
        )
        == 2
    )
    assert "full fine-tuning runs do not checkpoint" in capsys.readouterr().err
    assert main(common + ["--methods", "full:gamma=1", "--out", str(tmp_path / "c3")]) == 2
    assert "takes no settings" in capsys.readouterr().err


def test_cpu_model_is_read_once_for_fingerprint_and_hardware(monkeypatch):
    """The CPU's name has one reader: the fingerprint's and compare's hardware() agree, the
    first "model name" wins, and a CPU without one (ARM's /proc/cpuinfo) gives None."""
    from srlora_lab.experiments import compare, fingerprint

    lines = ["processor : 0", "model name : Fancy CPU 9", "flags : b a", "model name : Other"]
    assert fingerprint.cpu_model(lines) == "Fancy CPU 9"
    assert fingerprint.cpu_model(["processor : 0", "Features : fp asimd"]) is None
    monkeypatch.setattr(fingerprint, "_cpuinfo_lines", lambda: lines)
    monkeypatch.setattr(compare, "cpu_model", fingerprint.cpu_model)
    info = fingerprint._cpuinfo()
    assert info["cpu"] == compare.hardware()["cpu"] == "Fancy CPU 9"
    monkeypatch.setattr(fingerprint, "_cpuinfo_lines", lambda: ["flags : a b"])
    assert fingerprint._cpuinfo()["flags_sha"] == info["flags_sha"]  # sorted flags, same hash


def test_load_done_reads_each_record_once(finished, tiny_dir, monkeypatch):
    """--resume's load: one read per run file (it was two: a check pass, then a load pass), and
    every finished run is found."""
    seen = []
    real = study.read_record
    monkeypatch.setattr(study, "read_record", lambda p: seen.append(p) or real(p))
    spec = json.load(open(os.path.join(finished, "spec.json")))
    n = study.Study(spec, str(finished)).load_done()
    assert n == len(_files(finished)) > 0
    assert sorted(seen) == _files(finished)
