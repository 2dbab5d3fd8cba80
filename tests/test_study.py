"""`srlora study`: the spec's checks, the verdict rules and statistics, and a tiny study end to end
(a kill -9 mid-study, --resume, and --jobs 2 giving the same records as --jobs 1)."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from srlora_lab.cli import main
from srlora_lab.experiments import study_spec
from srlora_lab.experiments.study_verdicts import (
    claim_outcome,
    compare,
    seeds_needed,
    train_auc,
    early_point,
    verdict,
)
from test_compare_cli import ENV, synthetic_csv, tiny_model

TIMING = {
    "wall_time_s",
    "train_time_s",
    "eval_time_s",
    "setup_time_s",
    "diagnostics_time_s",
    "sha256",
}  # the checksum covers the timings


def base_spec(**over):
    spec = {
        "name": "tiny",
        "lrs": [1e-3, 3e-3, 1e-2],
        "selection": {"seeds": [10, 11]},
        "final": {"seeds": [0, 1, 2, 3, 4]},
        "methods": ["lora", "pissa", "srlora"],
        "tasks": [{"name": "rt-polarity", "steps": 100}],
    }
    spec.update(over)
    return spec


# ------------------------------------------------------------------ spec
def test_spec_resolves_defaults_shorthands_and_grids(tmp_path):
    spec = study_spec.parse(
        base_spec(
            methods=[
                "lora",
                {"name": "srlora-keep", "method": "srlora", "optimizer_state": "keep"},
                {"name": "dora", "method": "dora"},
                "olora",
            ],
            tasks=[
                {"name": "rt-polarity", "steps": 200, "lrs": {"dora": [1e-4, 2e-4, 4e-4]}},
                "mnist",
            ],
            selection={"seeds": [7, 8], "steps_frac": 0.5},
        )
    )
    rt, mn = spec["tasks"]
    assert rt["steps"] == 200 and rt["selection_steps"] == 100 and rt["batch_size"] == 16
    assert mn["steps"] == 100 and mn["model"] == "efficientnet-lite0" and mn["r"] == 4
    assert rt["lrs"]["dora"] == [1e-4, 2e-4, 4e-4] and rt["lrs"]["lora"] == [1e-3, 3e-3, 1e-2]
    m = {x["name"]: x for x in spec["methods"]}
    assert m["dora"] == {
        "name": "dora",
        "method": "lora",
        "config": {"extra_lora_kwargs": {"use_dora": True}},
    }
    assert m["olora"]["config"] == {"extra_lora_kwargs": {"init_lora_weights": "olora"}}
    assert m["srlora-keep"]["config"] == {"optimizer_state": "keep"}
    assert spec["pairs"][:2] == [["lora", "srlora-keep"], ["lora", "dora"]]
    assert len(spec["pairs"]) == 6 and spec["margins"] == {"accuracy": 0.5, "loss_rel": 0.02}
    # YAML 1.1 reads 1e-3 as a string: accepted as the number
    assert study_spec.parse(base_spec(lrs=["1e-3", "3e-3", "1e-2"]))["tasks"][0]["lrs"]["lora"] == [
        1e-3,
        3e-3,
        1e-2,
    ]


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"lrs": [1e-3, 3e-3]}, "lrs: needs at least 3 learning rates"),
        ({"selection": {"seeds": [1]}}, "selection.seeds: needs at least 2 seeds"),
        ({"final": {"seeds": [0, 1, 2]}}, "final.seeds: needs at least 5 seeds"),
        ({"final": {"seeds": [0, 1, 2, 3, 3]}}, "final.seeds: a seed is named twice"),
        ({"methods": ["lora", "qlora"]}, "methods[1].method: unknown method 'qlora'"),
        ({"methods": [{"name": "s", "method": "srlora", "gamma": 0.01}]}, "methods[0].gamma"),
        (
            {"methods": [{"name": "s", "method": "srlora", "optimzer_state": "keep"}]},
            "methods[0].optimzer_state: unknown key",
        ),
        ({"tasks": [{"name": "rt-polarity", "steps": 0}]}, "tasks[0].steps: must be >= 1"),
        (
            {"tasks": [{"name": "rt-polarity", "steps": 40, "eval_every": 25}]},
            "tasks[0].eval_every: 25 is over a quarter",
        ),
        ({"tasks": ["nope"]}, "tasks[0].name: unknown task 'nope'"),
        (
            {"tasks": [{"name": "rt-polarity", "lrs": {"dora": [1, 2, 3]}}]},
            "tasks[0].lrs.dora: not a method",
        ),
        ({"pairs": [["lora", "dora"]]}, "pairs[0][1]: 'dora' is not a method"),
        ({"margins": {"accuracy": -1}}, "margins.accuracy: expected a positive number"),
        ({"bogus": 1}, "spec.bogus: unknown key"),
        ({"lrs": [1e-3, "x", 1e-2]}, "lrs[1]: expected a positive number"),
    ],
)
def test_bad_spec_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, over, msg):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec(**over)))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_spec_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [rt-polarity\n")
    assert main(["study", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["study", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ statistics and verdicts
def test_paired_interval_against_a_hand_computed_example():
    """Differences a - b = 1, 2, 6 (three seeds): mean 3, sd sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) =
    sqrt(7); t_{0.975, 2} = 4.302653 (printed tables); half width 4.302653 * sqrt(7 / 3)."""
    a, b = {0: 71.0, 1: 72.0, 2: 80.0}, {0: 70.0, 1: 70.0, 2: 74.0}
    v = compare("t", "final_accuracy", "x", "y", a, b, {"accuracy": 0.5, "loss_rel": 0.02}, 3)
    half = 4.302653 * math.sqrt(7.0 / 3.0)
    assert v["n"] == 3 and v["mean_diff"] == pytest.approx(3.0, abs=1e-12)
    assert v["sd_diff"] == pytest.approx(math.sqrt(7.0), rel=1e-12)
    assert v["ci_low"] == pytest.approx(3.0 - half, abs=1e-5)
    assert v["ci_high"] == pytest.approx(3.0 + half, abs=1e-5)
    assert v["verdict"] == "inconclusive" and v["complete"]
    # seeds needed: half width <= max(|3|, 0.5 - 3) = 3. n = 5: t_{.975,4} = 2.776445,
    # 2.776445 * sqrt(7) / sqrt(5) = 3.285 > 3; n = 6: t_{.975,5} = 2.570582 -> 2.776 <= 3
    assert v["seeds_needed"] == 6
    # a loss: 2% of the mean of both methods' values is the margin
    lo = compare(
        "t",
        "final_test_loss",
        "x",
        "y",
        {0: 0.50, 1: 0.52},
        {0: 0.50, 1: 0.50},
        {"accuracy": 0.5, "loss_rel": 0.02},
        5,
    )
    assert lo["margin"] == pytest.approx(0.02 * 0.505) and not lo["complete"]
    assert lo["higher_is_better"] is False


@pytest.mark.parametrize(
    "lo,hi,margin,higher,expected",
    [
        (1e-9, 2.0, 0.5, True, "better"),  # just excludes 0 above
        (0.0, 2.0, 0.5, True, "inconclusive"),  # touches 0: not excluded
        (0.0, 0.5, 0.5, True, "equivalent"),  # inside the margin, ends included
        (-0.5, 0.5, 0.5, True, "equivalent"),
        (-0.5000001, 0.5, 0.5, True, "inconclusive"),
        (-2.0, -1e-9, 0.5, True, "worse"),
        (-2.0, -1e-9, 0.5, False, "better"),  # a loss: below 0 is better for a
        (1e-9, 2.0, 0.5, False, "worse"),
        (0.1, 0.2, 0.5, True, "better"),  # excludes 0 wins over equivalence
    ],
)
def test_verdict_rules_at_their_boundaries(lo, hi, margin, higher, expected):
    assert verdict(lo, hi, margin, higher) == expected


def test_seeds_needed_and_claim_outcomes():
    assert seeds_needed(0.0, float("nan"), 0.5) is None
    assert seeds_needed(0.0, 0.0, 0.5) == 2
    # mean 0, sd 1, margin 0.5: h = 0.5; n = 18: t_{.975,17} = 2.109816 * 1/sqrt(18) = 0.4973
    # n = 17: t_{.975,16} = 2.119905 / sqrt(17) = 0.5142 > 0.5
    assert seeds_needed(0.0, 1.0, 0.5) == 18
    assert claim_outcome("better", ["better", "better"]) == "holds"
    assert claim_outcome("better", ["better", "equivalent"]) == "fails (no gain)"
    assert claim_outcome("better", ["better", "inconclusive"]) == "inconclusive"
    assert claim_outcome("at_least", ["equivalent", "better"]) == "holds"
    assert claim_outcome("at_least", ["equivalent", "worse"]) == "fails (worse)"
    assert claim_outcome("worse", ["worse"]) == "holds"
    assert claim_outcome("worse", []) == "not run"
    assert train_auc([4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 3.0  # first 2 of 8 steps
    curve = [{"step": s, "loss": s} for s in (3, 6, 9, 12)]
    assert early_point(curve, 12)["step"] == 3 and early_point(curve, 24)["step"] == 6


# ------------------------------------------------------------------ end to end (tiny BERT)
@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    tiny_model(str(d / "tiny-bert"))
    synthetic_csv(str(d / "d.csv"))
    spec = {
        "name": "tiny",
        "smoke": True,
        "lrs": [1e-2],
        "selection": {"seeds": [0]},
        "final": {"seeds": [0, 1]},
        "methods": ["lora", "srlora"],
        "tasks": [
            {
                "name": "tiny",
                "dataset": "d.csv",
                "model": "tiny-bert",
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
    (d / "spec.yaml").write_text(yaml.safe_dump(spec))
    return d / "spec.yaml"


def _records(out):
    recs = {}
    for p in sorted(glob.glob(os.path.join(out, "runs", "**", "*.json"), recursive=True)):
        with open(p) as f:
            recs[os.path.relpath(p, out)] = {
                k: v for k, v in json.load(f).items() if k not in TIMING
            }
    return recs


@pytest.mark.slow  # three CLI processes and two spawned workers: ~40 s on an idle 2-core CPU
def test_kill_resume_and_jobs_2_give_the_records_of_an_uninterrupted_run(
    tiny_spec, tmp_path, capsys
):
    cmd = [
        sys.executable,
        "-m",
        "srlora",
        "study",
        str(tiny_spec),
        "--no-progress",
        "--threads",
        "1",
    ]
    env = dict(ENV, OMP_NUM_THREADS="1")
    # --jobs 2, uninterrupted
    full = tmp_path / "full"
    p = subprocess.run(
        cmd + ["--out", str(full), "--jobs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _records(full)
    # selection seed 0 at the final steps and the one lr: shared with the final phase
    assert len(ref) == 4 and all(not r["failed"] for r in ref.values())
    summary = json.loads((full / "study.json").read_text())
    assert summary["status"] == "finished" and len(summary["runs"]) == 4
    assert {(v["metric"], v["n"]) for v in summary["verdicts"]} >= {
        ("final_accuracy", 2),
        ("train_auc25", 2),
    }
    assert "train_loss" not in summary["runs"][0]
    assert (full / "forest.png").stat().st_size > 5000
    assert (full / "curves-tiny.png").stat().st_size > 5000
    assert "| claim |" in (full / "verdicts.md").read_text()
    # --jobs 1, killed (SIGKILL) once the first run is written, then resumed
    part = tmp_path / "part"
    proc = subprocess.Popen(
        cmd + ["--out", str(part)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not glob.glob(str(part / "runs" / "**" / "*.json"), recursive=True):
        assert proc.poll() is None and time.time() < deadline, "the study ended too early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _records(part)
    assert 1 <= len(kept) < 4
    assert json.loads((part / "study.json").read_text())["status"] == "running"
    # a changed spec is refused, naming the difference
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load(tiny_spec.read_text())
    raw["tasks"][0]["steps"] = 12
    raw["tasks"][0]["dataset"] = str(tiny_spec.parent / "d.csv")
    raw["tasks"][0]["model"] = str(tiny_spec.parent / "tiny-bert")
    other.write_text(yaml.safe_dump(raw))
    assert main(["study", str(other), "--out", str(part), "--resume"]) == 2
    assert "spec.tasks[0].steps" in capsys.readouterr().err
    assert main(["study", str(tiny_spec), "--out", str(part)]) == 2  # no --resume: refused
    assert "pass --resume" in capsys.readouterr().err
    p = subprocess.run(
        cmd + ["--out", str(part), "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resume: {len(kept)} finished run(s)" in p.stdout
    assert _records(part) == ref


@pytest.mark.slow  # two in-process studies of a tiny model: ~30 s
def test_tasks_runs_a_subset_and_resume_finishes_the_rest(tiny_spec, tmp_path, capsys):
    raw = yaml.safe_load(tiny_spec.read_text())
    t = dict(
        raw["tasks"][0],
        dataset=str(tiny_spec.parent / "d.csv"),
        model=str(tiny_spec.parent / "tiny-bert"),
    )
    raw["tasks"] = [t, dict(t, name="tiny2")]
    spec = tmp_path / "two.yaml"
    spec.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    common = ["study", str(spec), "--out", str(out), "--threads", "1", "--no-progress"]
    assert main(common + ["--tasks", "tiny2", "--methods", "srlora"]) == 0
    assert sorted(os.listdir(out / "runs")) == ["tiny2"]
    assert sorted(os.listdir(out / "runs" / "tiny2")) == ["srlora"]
    assert json.loads((out / "study.json").read_text())["status"] == "partial"
    assert main(common + ["--resume", "--tasks", "tiny2"]) == 0
    assert "resume: 2 finished run(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out / "runs" / "tiny2")) == ["lora", "srlora"]
    assert main(common + ["--resume"]) == 0
    assert "resume: 4 finished run(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out / "runs")) == ["tiny", "tiny2"]
    assert json.loads((out / "study.json").read_text())["status"] == "finished"


def test_a_method_may_set_the_rank_the_task_sets_too(tiny_spec):
    """A method's own r (or any field the task also sets) overrides the task's in the up-front
    adapter check, as in the runs (it raised 'multiple values for keyword argument' before);
    a rank the task cannot take (above its r_target, 12) still fails there, naming the method."""
    from srlora_lab.experiments import study_jobs

    raw = yaml.safe_load(tiny_spec.read_text())
    raw["tasks"][0].update(
        dataset=str(tiny_spec.parent / "d.csv"), model=str(tiny_spec.parent / "tiny-bert")
    )
    raw["methods"] = [
        "lora",
        {"name": "lora-r2", "method": "lora", "r": 2, "lora_alpha": 4},
        {"name": "srlora-g", "method": "srlora", "gamma": 0.25},
    ]
    spec = study_spec.parse(raw)
    task = spec["tasks"][0]
    study_jobs.check_adapters(task, spec["methods"])
    huge = study_spec.parse(dict(raw, methods=[{"name": "big", "method": "srlora", "r": 16}]))
    with pytest.raises(study_jobs.TaskError, match="method 'big'"):
        study_jobs.check_adapters(task, huge["methods"])


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux: /proc/<pid>/stat)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # a CLI process and two spawned workers killed part-way: ~20 s
def test_a_killed_study_leaves_no_worker_behind(tiny_spec, tmp_path):
    """SIGKILL of `srlora study --jobs 2` while both workers train: the workers end within
    seconds (before, they finished their runs and then spun on the dead pool's queue)."""
    raw = yaml.safe_load(tiny_spec.read_text())
    raw["tasks"][0].update(
        steps=4000,
        dataset=str(tiny_spec.parent / "d.csv"),
        model=str(tiny_spec.parent / "tiny-bert"),
    )
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "srlora",
            "study",
            str(spec),
            "--out",
            str(tmp_path / "out"),
            "--jobs",
            "2",
            "--threads",
            "1",
            "--no-progress",
        ],
        env=dict(ENV, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, workers = time.time() + 120, []
        while len(workers) < 2:  # the two pool workers (spawn), not the resource tracker
            assert proc.poll() is None and time.time() < deadline, "no two workers started"
            workers = []
            for c in _children(proc.pid):
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    if b"spawn_main" in f.read():
                        workers.append(c)
            time.sleep(0.2)
        time.sleep(3.0)  # both inside their runs
        assert all(_alive(w) for w in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 20
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker(s) {left} outlived the killed study"
    assert not glob.glob(str(tmp_path / "out" / "runs" / "**" / "*.json"), recursive=True)


def test_the_shipped_specs_and_the_docs_example_parse(tmp_path):
    """studies/*.yaml and the spec-format example of docs/study.md are valid specs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "studies", "*.yaml")))
    assert {os.path.basename(p) for p in paths} >= {"paper-claims.yaml", "gpu.yaml", "smoke.yaml"}
    for p in paths:
        spec = study_spec.load(p)
        assert spec["tasks"] and spec["methods"], p
    claims = study_spec.load(os.path.join(root, "studies", "paper-claims.yaml"))
    assert [t["name"] for t in claims["tasks"]][:3] == ["rt-polarity", "fashion-mnist", "mnist"]
    assert not claims["smoke"] and len(claims["final"]["seeds"]) >= 5
    with open(os.path.join(root, "docs", "study.md")) as f:
        block = f.read().split("## Spec format\n```yaml\n")[1].split("```")[0]
    os.makedirs(tmp_path / "data")
    synthetic_csv(str(tmp_path / "data" / "my.csv"))
    spec = study_spec.parse(yaml.safe_load(block), str(tmp_path))
    assert [m["name"] for m in spec["methods"]][3:] == ["srlora-keep", "dora"]
    assert spec["tasks"][2]["dataset"] == str(tmp_path / "data" / "my.csv")
    assert spec["tasks"][1]["lrs"]["lora"] == [1e-4, 3e-4, 1e-3]


def test_claims_read_each_pair_from_srloras_side():
    from srlora_lab.experiments.study_verdicts import claims

    def v(task, metric, a, b, verdict):
        return {"task": task, "metric": metric, "a": a, "b": b, "verdict": verdict}

    vs = [
        v("mnist", "final_accuracy", "lora", "srlora", "better"),  # read: srlora worse
        v("rt-polarity", "final_accuracy", "srlora", "lora", "equivalent"),
        v("rt-polarity", "final_accuracy", "pissa", "srlora", "worse"),  # read: srlora better
        v("rt-polarity", "train_auc25", "srlora", "lora", "better"),
        v("rt-polarity", "early_test_loss", "srlora", "lora", "better"),
        v("rt-polarity", "train_auc25", "srlora", "pissa", "inconclusive"),
    ]
    c = {x["id"]: x["tasks"] for x in claims(vs, ["rt-polarity", "mnist"])}
    assert c[4]["mnist"]["outcome"] == "holds"
    assert c[4]["mnist"]["verdicts"] == [
        {"metric": "final_accuracy", "against": "lora", "verdict": "worse"}
    ]
    assert c[2]["rt-polarity"]["outcome"] == "holds"
    assert c[1]["rt-polarity"]["outcome"] == "inconclusive"
    assert c[1]["mnist"]["outcome"] == "not run" and c[3] == {}


def test_pairs_table_gives_each_pairs_loss_and_accuracy_verdicts_per_task():
    from srlora_lab.experiments.study_report import format_markdown, pairs_table

    def v(task, metric, a, b, verdict, complete=True):
        return {
            "task": task,
            "metric": metric,
            "a": a,
            "b": b,
            "verdict": verdict,
            "complete": complete,
        }

    summary = {
        "spec": {
            "tasks": [{"name": "rt-polarity"}, {"name": "mnist"}],
            "pairs": [["srlora-gradient", "srlora"], ["srlora", "pissa"]],
        },
        "verdicts": [
            v("rt-polarity", "final_test_loss", "srlora-gradient", "srlora", "better"),
            v("rt-polarity", "final_accuracy", "srlora-gradient", "srlora", "inconclusive"),
            v("rt-polarity", "val_loss", "srlora-gradient", "srlora", "worse"),
            v("mnist", "final_test_loss", "srlora", "pissa", "worse", False),
        ],
    }
    assert pairs_table(summary).splitlines()[2:] == [
        "| srlora-gradient vs srlora | loss better, acc inconclusive | - |",
        "| srlora vs pissa | - | loss worse [partial] |",
    ]
    # a study without LoRA (the variants) has no claims table; the pairs table heads it
    full = {
        **summary,
        "status": "complete",
        "wall_time_s": 60.0,
        "claims": [],
        "lr_selection": {"criterion": "c", "tasks": {}},
        "spec": {
            **summary["spec"],
            "name": "v",
            "margins": {"accuracy": 0.5, "loss_rel": 0.02},
            "methods": ["pissa", "srlora"],
            "tasks": [],
        },
    }
    md = format_markdown(full)
    assert "Claims" not in md and "Pairs" in md


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([], "not run"),
        (["better", "worse"], "worse"),
        (["better", "inconclusive"], "better"),
        (["equivalent", "equivalent"], "equivalent"),
        (["equivalent", "inconclusive"], "inconclusive"),
    ],
)
def test_a_tasks_standing_from_its_loss_and_accuracy_verdicts(verdicts, expected):
    from srlora_lab.experiments.study_verdicts import standing

    assert standing(verdicts) == expected


def test_the_default_rule_reads_both_orders_of_a_pair_and_needs_every_task():
    from srlora_lab.experiments.study_report import format_markdown, rule_table
    from srlora_lab.experiments.study_verdicts import default_rule, rule_outcome

    def v(task, metric, a, b, verdict, complete=True):
        return {
            "task": task,
            "metric": metric,
            "a": a,
            "b": b,
            "verdict": verdict,
            "complete": complete,
        }

    vs = [
        v("rt", "final_test_loss", "srlora-x", "srlora", "better"),
        v("rt", "final_accuracy", "srlora", "srlora-x", "equivalent"),
        v("rt", "val_loss", "srlora-x", "srlora", "worse"),  # not a rule metric
        v("mnist", "final_test_loss", "srlora", "srlora-x", "better"),  # read: x worse
        v("fm", "final_accuracy", "srlora-x", "srlora", "better", complete=False),
    ]
    r = default_rule(vs, ["rt", "mnist", "fm"], "srlora-x")
    assert r["tasks"] == {"rt": "better", "mnist": "worse", "fm": "partial"}
    assert r["outcome"] == "fails (worse)"
    r2 = default_rule(vs[:2], ["rt", "mnist"], "srlora-x")
    assert r2["tasks"] == {"rt": "better", "mnist": "not run"} and r2["outcome"] == "undecided"
    assert default_rule(vs[:2], ["rt"], "srlora-x")["outcome"] == "passes"
    assert rule_outcome(["equivalent", "equivalent"]) == "fails (no gain)"
    assert rule_outcome(["better", "inconclusive"]) == "undecided"
    # the report's table: variants of srlora paired with it, in spec order; controls left out
    summary = {
        "spec": {
            "name": "v",
            "tasks": [{"name": "rt"}, {"name": "mnist"}],
            "margins": {"accuracy": 0.5, "loss_rel": 0.02},
            "pairs": [["srlora-x", "srlora"], ["srlora-x", "pissa"]],
            "methods": [
                {"name": "pissa", "method": "pissa", "config": {}},
                {"name": "srlora", "method": "srlora", "config": {}},
                {"name": "srlora-i40", "method": "srlora", "config": {"switch_interval": 40}},
                {"name": "srlora-x", "method": "srlora", "config": {"optimizer_state": "rewarm"}},
            ],
        },
        "verdicts": vs + [v("rt", "final_accuracy", "srlora-x", "pissa", "worse")],
        "status": "complete",
        "wall_time_s": 60.0,
        "claims": [],
        "lr_selection": {"criterion": "c", "tasks": {}},
    }
    assert rule_table(summary).splitlines()[2:] == [
        "| srlora-x | better / worse | worse / not run | fails (worse) |"
    ]
    assert "Default rule" in format_markdown({**summary, "spec": {**summary["spec"], "tasks": []}})


def test_bad_flags_and_unloadable_data_exit_2_before_anything_is_written(tmp_path, capsys):
    good = tmp_path / "spec.yaml"
    good.write_text(yaml.safe_dump(base_spec()))
    out = tmp_path / "out"
    assert main(["study", str(good), "--out", str(out), "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1" in capsys.readouterr().err
    assert main(["study", str(good), "--out", str(out), "--threads", "0"]) == 2
    assert "--threads: must be >= 1" in capsys.readouterr().err
    assert main(["study", str(good), "--out", str(out), "--tasks", "rt-polarity,cifar"]) == 2
    assert (
        "--tasks: cifar: not a task of the spec (its tasks: rt-polarity)" in capsys.readouterr().err
    )
    assert main(["study", str(good), "--out", str(out), "--methods", "srlora,dora"]) == 2
    assert (
        "--methods: dora: not a method of the spec (its methods: lora, pissa, srlora)"
        in capsys.readouterr().err
    )
    (tmp_path / "cols.csv").write_text("sentence,label\na b,1\nc d,0\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_spec(tasks=[{"name": "mine", "dataset": "cols.csv"}])))
    assert main(["study", str(bad), "--out", str(out)]) == 2
    assert "task 'mine'" in capsys.readouterr().err
    assert not out.exists()


def test_methods_subset_plans_only_those_methods(tmp_path):
    """--methods: ready() and pending_total() hold only the named methods' runs, in the same
    order as the whole study's; every method still counts in the verdicts."""
    from srlora_lab.experiments.study import Study

    spec = study_spec.parse(
        base_spec(
            methods=["lora", "pissa", "srlora"], selection={"seeds": [10, 11], "steps_frac": 0.5}
        )
    )
    whole, part = Study(spec, str(tmp_path)), Study(spec, str(tmp_path), None, {"srlora"})
    assert part.ready() == [k for k in whole.ready() if k[1] == "srlora"] != []
    assert part.pending_total() == whole.pending_total() // 3  # 3 methods, same grid and seeds


def test_schedule_order_and_lr_choice(tmp_path):
    """First task's selection, then its final runs (at the lr of lowest mean validation loss)
    before the next task's selection; ties on the loss go to the higher validation accuracy."""
    from srlora_lab.experiments.study import Study

    spec = study_spec.parse(
        base_spec(
            methods=["lora", "srlora"],
            tasks=[{"name": "rt-polarity", "steps": 100}, {"name": "mnist", "steps": 100}],
            selection={"seeds": [10, 11], "steps_frac": 0.5},
        )
    )
    st = Study(spec, str(tmp_path))
    first = st.ready()
    assert len(first) == 2 * 2 * 3 * 2 and all(
        k[0] == "rt-polarity" and k[3] == 50 for k in first[:12]
    )
    val = {1e-3: (0.50, 0.8), 3e-3: (0.40, 0.7), 1e-2: (0.40, 0.9)}  # lora: 1e-2 wins the tie
    for task, m, lr, steps, seed in first[:12]:
        loss, acc = val[lr] if m == "lora" else (0.3 if lr == 1e-3 else 0.6, 0.5)
        st.runs[(task, m, lr, steps, seed)] = {
            "val_loss": loss + seed * 1e-3,
            "val_accuracy": acc,
            "seed": seed,
        }
    assert st.chosen(spec["tasks"][0], "lora") == 1e-2
    assert st.chosen(spec["tasks"][0], "srlora") == 1e-3
    nxt = st.ready()
    assert nxt[:10] == [
        ("rt-polarity", m, 1e-2 if m == "lora" else 1e-3, 100, s)
        for s in range(5)
        for m in ("lora", "srlora")
    ]
    assert all(k[0] == "mnist" for k in nxt[10:])
    assert st.pending_total() == len(nxt) + 2 * 5  # + mnist's final runs, lr not yet chosen
    # --tasks mnist: only mnist's jobs, in the same order; the verdicts still cover every task
    st.only = {"mnist"}
    assert st.ready() == nxt[10:] and st.pending_total() == len(nxt) - 10 + 2 * 5
    st.only = {"rt-polarity"}
    assert st.ready() == nxt[:10] and st.pending_total() == 10


def test_reuse_copies_only_the_runs_this_study_would_run_identically(tmp_path):
    """--reuse: another study's finished runs are copied when task settings, method (and its
    fields), lr, steps and seed all match this spec's plan; nothing else."""
    from srlora_lab.experiments.study import reuse_runs, run_file

    mk = lambda methods, steps: study_spec.parse(
        base_spec(
            methods=methods,
            tasks=[{"name": "rt-polarity", "steps": steps}, {"name": "mnist", "steps": 100}],
        )
    )
    theirs = mk(
        ["lora", "srlora", {"name": "srlora-keep", "method": "srlora", "optimizer_state": "keep"}],
        200,
    )
    mine = mk(
        [
            "lora",
            "srlora",
            {"name": "srlora-keep", "method": "srlora", "optimizer_state": "zero"},
            "pissa",
        ],
        200,
    )
    other, out = tmp_path / "other", tmp_path / "out"
    os.makedirs(other)
    (other / "spec.json").write_text(json.dumps(theirs))
    files = []
    for task in theirs["tasks"]:
        for m in ("lora", "srlora", "srlora-keep"):
            for lr in (1e-3, 0.05):  # 0.05: not in the grid
                for steps, seed in (
                    (task["selection_steps"], 10),
                    (task["steps"], 0),
                    (task["steps"], 7),
                ):  # seed 7: not in the plan
                    f = run_file(str(other), task["name"], m, lr, steps, seed)
                    os.makedirs(os.path.dirname(f), exist_ok=True)
                    with open(f, "w") as fh:
                        json.dump({"task": task["name"], "name": m, "lr": lr, "seed": seed}, fh)
                    files.append(f)
    got = reuse_runs(mine, str(out), str(other))
    copied = sorted(
        os.path.relpath(p, out)
        for p in glob.glob(str(out / "runs" / "**" / "*.json"), recursive=True)
    )
    want = sorted(
        os.path.relpath(run_file(str(out), t["name"], m, 1e-3, steps, seed), out)
        for t in mine["tasks"]
        for m in ("lora", "srlora")
        for steps, seed in ((t["selection_steps"], 10), (t["steps"], 0))
    )
    assert copied == want and got["copied"] == len(want) == 8
    assert got["skipped"]["method differs or absent"] == 4  # srlora-keep (zero), pissa: 2 tasks
    # a task whose settings differ is not reused at all; existing files are kept
    changed = mk(["lora"], 300)
    again = reuse_runs(changed, str(out), str(other))
    assert again["copied"] == 0 and again["skipped"] == {"task differs or absent": 1}


def test_report_writes_the_verdicts_of_a_study_stopped_part_way(tmp_path, capsys):
    """--report runs nothing: it recomputes the verdicts and the mechanism table from the run
    files in --out and writes verdicts.md; refused without a study or with another spec."""
    from srlora_lab.experiments.study import run_file
    from srlora_lab.experiments.study_jobs import write_json

    raw = base_spec(methods=["lora", "srlora"], selection={"seeds": [10, 11], "steps_frac": 0.5})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    spec = study_spec.load(str(tmp_path / "s.yaml"))
    out = tmp_path / "out"
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(out), "--report"]) == 2
    assert "holds no study" in capsys.readouterr().err
    os.makedirs(out)
    write_json(str(out / "spec.json"), spec)
    write_json(
        str(out / "study.json"), {"meta": {"jobs": 1}, "status": "running", "wall_time_s": 60.0}
    )

    def rec(m, lr, steps, seed, acc, loss, diag, train=None, switches=()):
        r = {
            "task": "rt-polarity",
            "name": m,
            "method": m,
            "lr": lr,
            "seed": seed,
            "steps": steps,
            "failed": False,
            "final_accuracy": acc,
            "val_accuracy": acc,
            "final_test_loss": loss,
            "val_loss": loss,
            "train_loss": train or [1.0] * steps,
            "switch_steps": list(switches),
            "num_switches": len(switches),
            "eval_curve": [{"step": k, "loss": loss} for k in (steps // 4, steps)],
            "val_curve": [{"step": k, "loss": loss} for k in (steps // 4, steps)],
            "diagnostics": {"summary": diag},
        }
        write_json(run_file(str(out), "rt-polarity", m, lr, steps, seed), r)

    sel_steps = spec["tasks"][0]["selection_steps"]
    assert sel_steps != 100
    for seed in (10, 11):  # selection: 1e-3 has the lowest validation loss for both
        for lr in (1e-3, 3e-3, 1e-2):
            for m in ("lora", "srlora"):
                rec(m, lr, sel_steps, seed, 0.7, 0.5 + lr, {})
    for seed in range(5):  # final: srlora 2 points and 0.03 loss behind, every seed
        rec("lora", 1e-3, 100, seed, 0.80 + 0.01 * seed, 0.40 - 0.01 * seed, {"erank_mean": 4.0})
        # training loss: level until the first switch (step 40), then 0.05 higher (+0.01 * seed)
        train = [1.0] * 40 + [1.05 + 0.01 * seed] * 60
        rec(
            "srlora",
            1e-3,
            100,
            seed,
            0.78 + 0.01 * seed,
            0.43 - 0.01 * seed,
            {"erank_mean": 50.0, "survived_frac": 0.1, "age_median": 20, "moved_median": 0.5},
            train,
            (40, 70),
        )
    assert main(["study", str(tmp_path / "s.yaml"), "--out", str(out), "--report"]) == 0
    md = (out / "verdicts.md").read_text()
    assert "| claim |" in md and "(running, 1 min)" in md
    assert (
        "| final_accuracy | lora vs srlora | 5 | 82.00 | 80.00 | 2.00 [2.00, 2.00] | 0 | 0.50 | "
        "better |" in md
    )
    assert "| srlora | 5 | 50.0 | 10.0 | 20 | 0.50 |" in md and "| lora | 5 | 4.0 | - |" in md
    # the gap: 0 before step 40, 0.07 +- 0.0157 (t_4 * sd 0.0158 / sqrt 5) after; jump at 40 is
    # the full 0.07, at 70 zero: mean 0.035 +- half that spread
    assert (
        "| srlora | lora | 0.001, 0.001 | 5 | +0.000 [0.000, 0.000] | +0.070 [0.050, 0.090] | "
        "+0.070 [0.050, 0.090] | +0.035 [0.025, 0.045] |" in md
    )
    raw["tasks"][0]["steps"] = 200
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    assert main(["study", str(tmp_path / "t.yaml"), "--out", str(out), "--report"]) == 2
    assert "another spec" in capsys.readouterr().err

    # pairs and margins say how runs are compared, not what they are: a changed set is taken,
    # said, and written back to spec.json and study.json with the recomputed verdicts
    raw["tasks"][0]["steps"] = 100
    raw["pairs"], raw["margins"] = [["srlora", "lora"]], {"accuracy": 1.0}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert main(["study", str(tmp_path / "p.yaml"), "--out", str(out), "--report"]) == 0
    assert "pairs and margins changed" in capsys.readouterr().out
    md = (out / "verdicts.md").read_text()
    assert (
        "| final_accuracy | srlora vs lora | 5 | 80.00 | 82.00 | -2.00 [-2.00, -2.00] | 0 | 1.00 | "
        "worse |"
        in md
        and "lora vs srlora" not in md
    )
    assert json.loads((out / "spec.json").read_text())["pairs"] == [["srlora", "lora"]]
    saved = json.loads((out / "study.json").read_text())
    assert {(v["a"], v["b"]) for v in saved["verdicts"]} == {("srlora", "lora")}
    assert saved["status"] == "running" and saved["wall_time_s"] >= 60.0
    # and the same spec again: nothing to say
    assert main(["study", str(tmp_path / "p.yaml"), "--out", str(out), "--report"]) == 0
    assert "changed" not in capsys.readouterr().out
