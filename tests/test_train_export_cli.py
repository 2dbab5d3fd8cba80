"""`srlora train --config` with checkpoints, exact `--resume`, and `srlora export` (peft, merged),
end to end on a tiny random BERT and a synthetic CSV."""

import json

import pytest
import torch
import yaml
from test_compare_cli import synthetic_csv, tiny_model

from srlora_lab.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    return {"model": tiny_model(str(d / "tiny-bert")), "csv": synthetic_csv(str(d / "d.csv"))}


def write_config(path, assets, out, **kw):
    cfg = dict(
        model=assets["model"],
        dataset=assets["csv"],
        method="srlora",
        seed=0,
        lr=5e-3,
        steps=12,
        batch_size=8,
        r=4,
        r_target=12,
        eval_every=4,
        out=str(out),
        target_modules=["query", "value"],
        save_every=4,
    )
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_resume_is_exact_and_export_reproduces(assets, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert (
        main(
            ["train", "--config", write_config(tmp_path / "a.yaml", assets, full), "--no-progress"]
        )
        == 0
    )
    # an interrupted twin: stop after step 6 (a checkpoint at 4), then resume from the folder
    cfg_b = write_config(tmp_path / "b.yaml", assets, part)
    from srlora_lab.experiments import runner

    real = runner.run_one

    def stop_at_6(*a, **k):
        def cb(step, *rest):
            if step == 6:
                raise KeyboardInterrupt

        return real(*a, **{**k, "callback": cb})

    runner.run_one = stop_at_6
    try:
        assert main(["train", "--config", cfg_b, "--no-progress"]) == 130
    finally:
        runner.run_one = real
    assert json.loads((part / "results.json").read_text())["runs"] == []
    # resumed with the same --config it was started with (save_every and out included)
    assert main(["train", "--config", cfg_b, "--resume", str(part), "--no-progress"]) == 0
    a = json.loads((full / "results.json").read_text())["runs"][0]
    b = json.loads((part / "results.json").read_text())["runs"][0]
    assert a["switch_steps"] == b["switch_steps"] == [2, 4, 6, 8]
    assert a["train_loss"] == b["train_loss"]  # bitwise: steps 5..12 replayed identically
    assert a["final_accuracy"] == b["final_accuracy"]
    from safetensors.torch import load_file

    ta = load_file(str(full / "checkpoints/srlora-lr0.005-seed0/step-12/model.safetensors"))
    tb = load_file(str(part / "checkpoints/srlora-lr0.005-seed0/step-12/model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    # export: a plain PEFT adapter on the ORIGINAL base reproduces the trained model
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    assert main(["export", str(full), "--format", "peft", "--out", str(tmp_path / "ad")]) == 0
    assert main(["export", str(full), "--format", "merged", "--out", str(tmp_path / "mg")]) == 0
    ids = torch.randint(5, 23, (3, 9))
    base = AutoModelForSequenceClassification.from_pretrained(assets["model"]).eval()
    y_base = base(input_ids=ids).logits
    peft = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "mg")).eval()
    y_peft, y_merged = peft(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (y_merged - y_base).norm() / y_base.norm() > 1e-2  # training changed the model
    assert float((y_peft - y_merged).norm() / y_merged.norm()) <= 1e-4


def test_train_bad_input_exits_2(assets, tmp_path, capsys):
    assert main(["train"]) == 2
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert (
        main(
            [
                "train",
                "--config",
                write_config(tmp_path / "c.yaml", assets, tmp_path / "o", bogus=1),
            ]
        )
        == 2
    )
    assert "unknown option 'bogus'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--config",
                write_config(
                    tmp_path / "d.yaml", assets, tmp_path / "o", method=["lora", "srlora"]
                ),
            ]
        )
        == 2
    )
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
