"""Issue 25's probe of the new surfaces (strategies, ReLoRA, the lab's ``full`` method and the
study's records): each case that did not hold, as a test that failed before its fix."""

import json
import re
import warnings

import pytest
import torch
from conftest import TinyNet

import srlora
from srlora.strategies import REGISTRY, get, register
from srlora.strategies.selection import Selection
from srlora.strategies.base import Strategy

RELORA = dict(
    method="relora",
    r=4,
    lora_alpha=8,
    target_modules=["query", "value"],
    total_steps=22,
    switch_interval=5,
)


@pytest.mark.parametrize(
    "field,value",
    [("gamma", 0.5), ("insertion", "svd"), ("exhaustion", "stop"), ("optimizer_state", "zero")],
)
def test_relora_refuses_a_preset_field_given_at_its_default(field, value):
    # the default value given explicitly was quietly replaced by the preset's
    with pytest.raises(ValueError, match=f"SRLoRAConfig.{field}: method='relora' sets {field}="):
        srlora.SRLoRAConfig(**RELORA, **{field: value})
    c = srlora.SRLoRAConfig(**RELORA)  # not given: the preset's value
    assert (c.gamma, c.insertion, c.exhaustion, c.optimizer_state) == (
        1.0,
        "lora",
        "extend",
        "prune",
    )


def test_relora_refuses_a_preset_field_set_back_to_its_default_after_construction():
    c = srlora.SRLoRAConfig(**RELORA)
    c.insertion = "svd"
    with pytest.raises(ValueError, match="SRLoRAConfig.insertion: method='relora' sets"):
        srlora.wrap(TinyNet(), c)
    c = srlora.SRLoRAConfig(r=4, target_modules=["query"], total_steps=10)
    c.method = "relora"  # the preset fills the fields never given
    c.validate()
    assert (c.gamma, c.insertion) == (1.0, "lora")
    assert srlora.SRLoRAConfig.from_dict(srlora.SRLoRAConfig(**RELORA).to_dict()).gamma == 1.0
    import copy

    c = srlora.SRLoRAConfig(r=4, target_modules=["query"], total_steps=10)
    d = copy.copy(c)
    d.gamma = 0.5  # given on the copy only
    c.method = "relora"
    c.validate()  # c never had gamma given: the preset fills it
    assert c.gamma == 1.0


def test_the_lab_still_runs_relora_with_the_tasks_default_gamma():
    from srlora_lab.experiments.runner import task_settings

    assert task_settings("relora", {"gamma": 0.5, "r": 4}) == {"r": 4}
    assert task_settings("relora", {"gamma": 0.25}) == {"gamma": 0.25}  # refused downstream
    assert task_settings("srlora", {"gamma": 0.5}) == {"gamma": 0.5}


def test_registering_a_taken_name_is_refused_unless_replace():
    importance = get("selection", "importance")
    with pytest.raises(ValueError, match="selection='importance' is already registered"):

        @register
        class Mine(Selection):
            name = "importance"

    assert get("selection", "importance") is importance
    try:

        @register(replace=True)
        class Mine2(Selection):
            name = "importance"

        assert get("selection", "importance") is Mine2
    finally:
        REGISTRY["selection"]["importance"] = importance


def test_registering_for_a_field_that_is_no_step_is_refused():
    with pytest.raises(ValueError, match="field 'colour' is not a step of the switch"):

        @register
        class Red(Strategy):
            field, name = "colour", "red"

    assert "colour" not in REGISTRY


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="relora", switch_interval=None, r_target=4),
        dict(method="srlora", r_target=5, gamma=0.5),
        dict(method="srlora", r_target=4, gamma=0.5, switch_interval=3),
    ],
)
def test_a_switching_method_that_plans_no_switch_warns_naming_r_target(kw):
    cfg = srlora.SRLoRAConfig(**(RELORA | kw))
    with pytest.warns(RuntimeWarning, match="SRLoRAConfig.r_target=.* plans no switch"):
        srlora.wrap(TinyNet(), cfg)


def test_relora_with_switch_interval_switches_past_r_target_without_that_warning():
    cfg = srlora.SRLoRAConfig(**(RELORA | dict(r_target=4)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*plans no switch")
        srlora.wrap(TinyNet(), cfg)


def test_relora_under_fsdp2_is_refused_naming_its_strategies_not_fusion_virtual():
    # "needs fusion='virtual'" was a dead end: relora's insertion refuses fusion='virtual'
    from srlora._errors import UnsupportedEngineError
    from srlora.fsdp_checks import check_fusion

    with pytest.raises(UnsupportedEngineError, match="does not support insertion='lora'"):
        check_fusion(srlora.SRLoRAConfig(**RELORA))
    with pytest.raises(UnsupportedEngineError, match="needs SRLoRAConfig\\(fusion='virtual'\\)"):
        check_fusion(srlora.SRLoRAConfig(r=4, total_steps=10))


def test_relora_on_a_4bit_base_is_refused_naming_a_way_that_works(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_quantized import TARGETS, assert_same_bytes, load, quantized_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    from srlora._errors import UnsupportedModuleError

    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).save_pretrained(tmp_path)
    q = load(tmp_path, "nf4-dq")
    before = quantized_bytes(q)
    with pytest.raises(
        UnsupportedModuleError, match="which insertion='lora' refuses.*method='lora'"
    ):
        srlora.wrap(
            q, srlora.SRLoRAConfig(method="relora", r=4, target_modules=TARGETS, total_steps=8)
        )
    assert not hasattr(q, "peft_config")
    assert_same_bytes(before, quantized_bytes(q))


def _spec(tmp_path, **over):
    (tmp_path / "d.csv").write_text("text,label\na,0\n")
    spec = {
        "name": "t",
        "smoke": True,
        "lrs": [1e-2],
        "selection": {"seeds": [0]},
        "final": {"seeds": [0, 1]},
        "methods": [{"name": "full", "method": "full", "lrs": [1e-3]}, "lora", "srlora"],
        "pairs": [["full", "lora"], ["srlora", "lora"]],
        "tasks": [
            {
                "name": "tiny",
                "dataset": str(tmp_path / "d.csv"),
                "model": "m",
                "steps": 8,
                "batch_size": 8,
                "r": 4,
                "r_target": 12,
                "eval_every": 2,
            }
        ],
    }
    return spec | over


@pytest.mark.parametrize(
    "entry,where,msg",
    [
        (
            {"full": "srlora", "lora": "lora"},
            "headroom[0].full",
            "'srlora' is not full fine-tuning",
        ),
        ({"full": "lora", "lora": "lora"}, "headroom[0].full", "'lora' is not full fine-tuning"),
        ({"full": "full", "lora": "full"}, "headroom[0].lora", "'full' is full fine-tuning"),
        (
            {"full": "full", "lora": "lora", "metrics": ["banana"]},
            "headroom[0].metrics[0]",
            "unknown metric 'banana'",
        ),
    ],
)
def test_a_headroom_that_cannot_be_measured_is_refused_naming_the_key(entry, where, msg, tmp_path):
    # each was accepted: the headroom measured from an adapter, against itself, or on a metric
    # no run has (then left out of the report without a word)
    from srlora_lab.experiments import study_spec

    with pytest.raises(study_spec.SpecError, match=re.escape(f"{where}: {msg}")):
        study_spec.parse(_spec(tmp_path, headroom=[{"methods": ["srlora"], **entry}]), "/tmp")
    study_spec.parse(
        _spec(tmp_path, headroom=[{"full": "full", "lora": "lora", "methods": ["srlora"]}]), "/tmp"
    )


def test_a_record_unreadable_as_text_or_stripped_of_its_checksum_is_damaged(tmp_path):
    # not UTF-8: a UnicodeDecodeError traceback from --report and --resume; a record with its
    # sha256 deleted and a value edited was read as a record from before checksums
    from srlora_lab.experiments import records

    bad = tmp_path / "seed=0.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(records.RecordError, match="seed=0.json: damaged run record .not UTF-8"):
        records.read_record(str(bad))
    rec = records.seal({"final_accuracy": 0.5, "fingerprint": {"id": "abc"}})
    bad.write_text(
        json.dumps({k: v for k, v in rec.items() if k != "sha256"} | {"final_accuracy": 0.9})
    )
    with pytest.raises(records.RecordError, match="machine fingerprint.*sha256.*gone"):
        records.read_record(str(bad))
    bad.write_text(json.dumps({"final_accuracy": 0.5}))  # before fingerprints and checksums
    assert records.read_record(str(bad)) == {"final_accuracy": 0.5}


def test_a_lock_path_that_cannot_be_opened_is_named(tmp_path):
    from srlora_lab.experiments import records

    (tmp_path / ".lock").mkdir()
    with pytest.raises(records.RecordError, match="cannot open the study's lock file"):
        records.StudyLock(str(tmp_path)).acquire()


@pytest.mark.parametrize(
    "damaged,flag,msg",
    [
        ("study.json", "--report", "run --resume on this folder"),
        ("spec.json", "--report", "restore it, or start a new --out"),
        ("spec.json", "--resume", "restore it, or start a new --out"),
    ],
)
def test_a_damaged_study_file_exits_2_naming_it(tmp_path, capsys, damaged, flag, msg):
    # each was a JSONDecodeError traceback, exit 1
    import yaml

    from srlora_lab.cli import main
    from srlora_lab.experiments import study_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    out = tmp_path / "study"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(study_spec.load(str(path))))
    (out / "study.json").write_text("{}")
    (out / damaged).write_text("{trunc")
    assert main(["study", str(path), "--out", str(out), flag, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: damaged or unreadable" in err and msg in err


def test_summary_never_writes_past_its_overwrite_check(tmp_path, capsys):
    # --out without an extension: matplotlib wrote OUT.png, replacing a user's OUT.png that the
    # --overwrite check (made on OUT) never saw, and the message named OUT
    from srlora_lab.cli import main

    study = tmp_path / "s"
    study.mkdir()
    (study / "study.json").write_text(
        json.dumps(
            {
                "verdicts": [
                    {
                        "task": "t",
                        "metric": "final_test_loss",
                        "complete": True,
                        "a": "full",
                        "b": "lora",
                        "mean_diff": 0.1,
                        "ci_low": 0.0,
                        "ci_high": 0.2,
                        "mean_b": 1.0,
                        "n": 3,
                    }
                ]
            }
        )
    )
    mine = tmp_path / "fig.png"
    mine.write_bytes(b"the user's picture")
    for out in (tmp_path / "fig", tmp_path / "fig.txt", tmp_path):
        assert main(["summary", str(study), "--out", str(out), "--overwrite"]) == 2
    assert "name the picture's file" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's picture"
    assert main(["summary", str(study), "--out", str(tmp_path / "new.png")]) == 0


@pytest.mark.parametrize(
    "text", ["{trunc", "[1]", '{"verdicts": [{"metric": "final_test_loss", "complete": true}]}']
)
def test_summary_names_a_study_json_it_cannot_read(tmp_path, capsys, text):
    from srlora_lab.cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(text)
    assert main(["summary", str(tmp_path / "s"), "--out", str(tmp_path / "x.png")]) == 2
    assert "study.json: damaged or not a study's summary" in capsys.readouterr().err


@pytest.mark.parametrize("selection", ["protect", "normalized"])
def test_a_selection_that_cannot_select_warns_naming_it(selection):
    # relora (gamma 1) fuses every pair: protect / normalized changed nothing, silently
    with pytest.warns(UserWarning, match=f"selection='{selection}' is ignored .round.gamma"):
        srlora.SRLoRAConfig(**RELORA, selection=selection)
    with pytest.warns(UserWarning, match="nothing to select"):
        srlora.SRLoRAConfig(r=4, gamma=1.0, r_target=12, total_steps=10, selection=selection)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        srlora.SRLoRAConfig(**RELORA)
        srlora.SRLoRAConfig(r=4, gamma=0.5, r_target=12, total_steps=10, selection=selection)


def test_a_confirmatory_metric_no_run_records_is_named_not_pending():
    # "banana_loss" passes the spec's rule (any *_loss key a record may have); when the pair is
    # complete on the other metrics it was reported "pending" for ever
    from srlora_lab.experiments.family import confirmatory

    declared = [
        {"task": "t", "a": "full", "b": "lora", "metric": m, "prediction": "x"}
        for m in ("final_test_loss", "banana_loss")
    ]
    v = {
        "task": "t",
        "a": "full",
        "b": "lora",
        "metric": "final_test_loss",
        "complete": True,
        "n": 3,
        "mean_a": 1.0,
        "mean_b": 1.1,
        "mean_diff": -0.1,
        "ci_low": -0.2,
        "ci_high": 0.0,
        "p": 0.01,
        "higher_is_better": False,
        "verdict": "better",
    }
    rows = confirmatory(declared, [v])
    assert rows[1]["finding"] == "not measured: no run records 'banana_loss'"
    assert confirmatory(declared, [{**v, "complete": False}])[1]["finding"] == "pending"


def test_resume_with_another_thread_count_names_threads_not_another_machine(tmp_path, capsys):
    # the thread count is part of the fingerprint: --resume --threads 2 on a study run with one
    # thread was told the runs came from another machine, and to resume there
    import yaml

    from srlora_lab.cli import main
    from srlora_lab.experiments import records, study_spec
    from srlora_lab.experiments.fingerprint import machine_fingerprint

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec(tmp_path)))
    out = tmp_path / "study"
    (out / "runs" / "tiny").mkdir(parents=True)
    (out / "spec.json").write_text(json.dumps(study_spec.load(str(path))))
    (out / "runs" / "tiny" / "seed=0.json").write_text(
        json.dumps(
            records.seal({"final_accuracy": 0.5, "fingerprint": machine_fingerprint(threads=1)})
        )
    )
    assert (
        main(["study", str(path), "--out", str(out), "--resume", "--threads", "2", "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "differs in threads (1 there, 2 here): pass --threads 1 to resume it" in err


def test_an_unregistered_strategy_name_names_the_way_to_register_it():
    # e.g. a checkpoint of a run with a strategy of the user's own, loaded before its module
    with pytest.raises(
        ValueError,
        match="selection: must be one of .*got 'smallest' .a "
        "strategy of your own: import the module",
    ):
        srlora.SRLoRAConfig(selection="smallest")
    with pytest.raises(ValueError, match="fusion: must be one of .*got 'x'$"):
        srlora.SRLoRAConfig(fusion="x")


def test_compare_full_alone_with_target_modules_that_match_nothing_names_the_flag(tmp_path, capsys):
    # it said "the adapter does not fit" for a run that has no adapter
    from test_compare_cli import synthetic_csv, tiny_model

    from srlora_lab.cli import main

    model, csv = tiny_model(str(tmp_path / "m")), synthetic_csv(str(tmp_path / "d.csv"))
    args = [
        "compare",
        "--model",
        model,
        "--dataset",
        csv,
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--seeds",
        "0",
        "--lr",
        "1e-3",
        "--no-progress",
        "--target-modules",
        "nonexistent",
    ]
    assert main(args + ["--methods", "full", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--target-modules (the modules whose change full fine-tuning" in err
    assert "adapter" not in err and "matches no module" in err
    assert main(args + ["--methods", "full,lora", "--out", str(tmp_path / "b")]) == 2
    assert "the adapter does not fit" in capsys.readouterr().err
