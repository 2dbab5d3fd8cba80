"""`srlora compare` end to end on a tiny random BERT and a synthetic CSV (seconds, offline)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from srlora_lab.cli import main

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
POS, NEG, FILL = (
    ["good", "great", "fine", "nice"],
    ["bad", "awful", "poor", "dull"],
    ["the", "film", "was", "a", "plot", "very", "quite", "story", "acting", "and"],
)


def tiny_model(path):
    """A randomly initialised 2-layer BERT classifier and a word-level tokenizer, saved."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POS + NEG + FILL
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(os.path.join(path, "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def synthetic_csv(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    rows = ["text,label"]
    for i in range(n):
        y = int(rng.integers(0, 2))
        words = list(rng.choice(FILL, 5)) + [rng.choice(POS if y else NEG)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if y else 'neg'}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    return {"model": tiny_model(str(d / "tiny-bert")), "csv": synthetic_csv(str(d / "d.csv"))}


def _args(a, out, *extra):
    return [
        "compare",
        "--model",
        a["model"],
        "--dataset",
        a["csv"],
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--r",
        "4",
        "--r-target",
        "12",
        "--eval-every",
        "4",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_compare_end_to_end(assets_dir, tmp_path):
    out = tmp_path / "out"
    args = _args(
        assets_dir,
        out,
        "--lr",
        "lora=1e-2,lora=3e-2,pissa=5e-3,srlora=5e-3",
        "--target-modules",
        "query,value",
    )
    args.remove("--no-progress")  # bars on, but stdout/stderr are pipes: they must stay quiet
    proc = subprocess.run(
        [sys.executable, "-m", "srlora", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "\r" not in log  # no tqdm carriage returns in a log file
    assert "is_gradient_checkpointing" not in log and "Warning" not in log, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "finished"
    assert len(res["runs"]) == 2 * (2 + 1 + 1)
    for r in res["runs"]:
        assert {
            "method",
            "seed",
            "final_accuracy",
            "train_loss",
            "eval_curve",
            "switch_steps",
            "wall_time_s",
            "lr",
        } <= set(r)
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert len(r["train_loss"]) == 12 and all(np.isfinite(r["train_loss"]))
        assert [c["step"] for c in r["eval_curve"]] == [4, 8, 12]
    sr = [r for r in res["runs"] if r["method"] == "srlora"]
    # r=4, gamma=0.5 -> r'=2; (12-4)//2 = 4 switches at k*floor(12/5) = 2,4,6,8
    assert all(r["switch_steps"] == [2, 4, 6, 8] for r in sr)
    assert all(len(r["switches"][0]["slots"][0]) == 2 for r in sr)
    assert all(r["switch_steps"] == [] for r in res["runs"] if r["method"] != "srlora")
    assert set(res["best_lr"]) == {"lora", "pissa", "srlora"}
    assert res["best_lr"]["lora"] in (1e-2, 3e-2)
    assert res["split"]["test"] + res["split"]["val"] + res["split"]["train"] <= 240
    for key in ("config", "versions", "hardware", "git_commit"):
        assert key in res
    assert res["versions"]["torch"]
    # same seed -> same data order and head init: the first loss is identical for every method
    # (adapters start as a no-op: LoRA's B = 0, PiSSA/SRLoRA subtract their init from W)
    first = {r["method"]: r["train_loss"][0] for r in res["runs"] if r["seed"] == 0}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    for png in ("loss.png", "accuracy.png", "importance.png"):
        assert (out / png).stat().st_size > 5000
    assert "full learning-rate grid" in proc.stdout
    for m in ("lora", "pissa", "srlora"):
        assert m in proc.stdout
    assert "±" in proc.stdout and (out / "table.txt").exists()
    # paired differences against LoRA at each method's selected lr, on the seeds all share
    assert "paired difference against lora" in proc.stdout
    paired = res["paired_vs_lora"]
    assert paired["seeds"] == [0, 1] and set(paired["methods"]) == {"pissa", "srlora"}
    from srlora_lab.experiments.stats import paired_interval

    lora = {
        r["seed"]: r
        for r in res["runs"]
        if r["method"] == "lora" and r["lr"] == res["best_lr"]["lora"]
    }
    sr = {r["seed"]: r for r in res["runs"] if r["method"] == "srlora"}
    want = paired_interval(
        [sr[s]["final_accuracy"] for s in (0, 1)], [lora[s]["final_accuracy"] for s in (0, 1)]
    )
    assert paired["methods"]["srlora"]["accuracy"] == want


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--task", "nope"], "unknown task"),
        (["--methods", "lora,nope"], "unknown method"),
        (["--methods", "srlora:bogus"], "is not a known setting"),
        (["--methods", "srlora:gamma=2"], "gamma"),
        (["--methods", "srlora:r=4"], None),  # fine on its own: checked below with a clash
        (["--methods", "srlora:selection=protect:protect:normalized"], "set twice"),
        (["--methods", "srlora:total_steps=3"], "not a setting a method can take"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--lr", "abc"], "not a number"),
        (["--lr", "-1"], "must be positive"),
        (["--seeds", "0,x"], "comma list of integers"),
        (["--gamma", "0.1"], "--gamma"),
        (["--r-target", "2"], "--r-target"),
        (["--target-modules", "nonexistent"], "matches no module"),
    ],
)
def test_bad_input_exits_2_before_training(assets_dir, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    args = _args(assets_dir, out, *extra)
    if extra[0] == "--task":  # a task name is only used without --dataset
        args = ["compare", "--task", "nope", "--out", str(out)]
    if msg is None:
        return
    assert main(args) == 2
    assert msg in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_unknown_model_and_missing_columns_exit_2(assets_dir, tmp_path, capsys):
    args = _args(assets_dir, tmp_path / "o")
    bad_model = list(args)
    bad_model[bad_model.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(bad_model) == 2
    assert "cannot load it" in capsys.readouterr().err
    csv = tmp_path / "cols.csv"
    csv.write_text("sentence,label\na b,1\nc d,0\n")
    bad_data = list(args)
    bad_data[bad_data.index("--dataset") + 1] = str(csv)
    assert main(bad_data) == 2
    assert "missing column(s) ['text']" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_unwritable_out_exits_2(assets_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_args(assets_dir, blocker / "sub")) == 2
    assert "not writable" in capsys.readouterr().err


def test_interrupt_keeps_finished_runs(assets_dir, tmp_path):
    """Ctrl-C during the third run: results.json holds the two finished runs."""
    from srlora_lab.cli.compare import build_config, prepare
    from srlora_lab.cli import build_parser
    from srlora_lab.experiments.compare import run_compare

    args = build_parser().parse_args(
        _args(assets_dir, tmp_path / "o", "--methods", "lora,srlora", "--lr", "1e-2")
    )
    cfg = build_config(args)
    bundle, enc, sp, meta = prepare(cfg)
    calls = {"n": 0}

    def interrupt(step, model, controller, optimizer, scheduler):
        calls["n"] += 1
        if calls["n"] == 2 * cfg.steps + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compare(
            cfg, bundle, enc, sp, meta, progress=False, log=lambda s: None, callback=interrupt
        )
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["status"] == "interrupted"
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("lora", 0), ("srlora", 0)]


def test_run_one_is_seeded_whatever_the_global_rng(assets_dir):
    """Same seed -> same LoRA init, data order and dropout: identical losses, even when the
    global torch RNG was consumed in between; another seed gives other losses."""
    import torch

    from srlora_lab.cli import build_parser
    from srlora_lab.cli.compare import build_config, prepare
    from srlora_lab.experiments.runner import run_one

    cfg = build_config(build_parser().parse_args(_args(assets_dir, "unused", "--lr", "1e-2")))
    bundle, enc, sp, _ = prepare(cfg)
    kw = dict(
        method="lora",
        lr=1e-2,
        steps=6,
        batch_size=8,
        r=4,
        lora_alpha=8,
        r_target=8,
        eval_every=6,
        eval_size=20,
        progress=False,
    )
    a = run_one(bundle, enc, sp, seed=0, **kw)["train_loss"]
    torch.rand(1000)
    b = run_one(bundle, enc, sp, seed=0, **kw)["train_loss"]
    c = run_one(bundle, enc, sp, seed=1, **kw)["train_loss"]
    assert a == b
    assert a != c


def test_task_defaults_resolve_and_are_listed_in_help():
    """Every built-in task's defaults resolve (its lr string gives one lr per method, also with a
    partial --lr override) and `srlora compare --help` prints them."""
    from srlora_lab.cli import build_parser
    from srlora_lab.cli.compare import _task_help, build_config, parse_lrs
    from srlora_lab.experiments.methods import BASE_METHODS as METHODS
    from srlora_lab.experiments.tasks import TASKS

    help_text = _task_help()
    for name, t in TASKS.items():
        d = t.defaults
        lrs = parse_lrs("", list(METHODS), d["lr"])
        assert all(len(lrs[m]) == 1 for m in METHODS), (name, lrs)
        assert parse_lrs("srlora=5e-2", list(METHODS), d["lr"])["srlora"] == [5e-2]
        assert parse_lrs("5e-2", list(METHODS), d["lr"]) == {m: [5e-2] for m in METHODS}
        block = re.split(r"\n  (?=\S)", help_text.split(f"  {name} ")[1])[0]
        for key, shown in (
            ("steps", d["steps"]),
            ("batch", d["batch_size"]),
            ("r", d["r"]),
            ("r_target", d["r_target"]),
            ("seeds", d["seeds"]),
            ("eval_every", d["eval_every"]),
            ("eval_size", d["eval_size"]),
        ):
            assert f" {key}={shown}" in block, (name, key, block)
        assert d["lr"] in block and ("image_size" if t.kind == "image" else "max_len") in block
        cfg = build_config(
            build_parser().parse_args(["compare", "--task", name, "--out", os.devnull])
        )
        assert cfg.steps == d["steps"] and cfg.max_test == d["max_test"]
        assert cfg.lrs == {m: lrs[m] for m in cfg.methods}  # the default --methods


def test_variants_run_beside_their_base(assets_dir, tmp_path, capsys):
    """--methods takes variants (experiments/methods.py): each runs with its settings, under its
    own name in the records, tables and paired differences."""
    out = tmp_path / "v"
    args = _args(
        assets_dir,
        out,
        "--methods",
        "lora,srlora,srlora:rewarm:protect,dora,pissa:r=2",
        "--seeds",
        "0",
        "--lr",
        "5e-3",
        "--target-modules",
        "query,value",
    )
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"lora", "srlora", "srlora:rewarm:protect", "dora", "pissa:r=2"}
    # a method's own r overrides the task's (--r 4): half the adapter parameters
    head = runs["lora"]["trainable_params"] - 2 * 4 * 2 * 32 * 2  # 2 layers x q,v x (A+B) 32x4
    assert runs["pissa:r=2"]["trainable_params"] - head == 2 * 2 * 2 * 32 * 2
    v = runs["srlora:rewarm:protect"]
    assert v["base_method"] == "srlora"
    assert v["config"] == {"optimizer_state": "rewarm", "selection": "protect"}
    assert runs["dora"]["config"] == {"extra_lora_kwargs": {"use_dora": True}}
    assert all("optimizer_step" in e for e in v["switches"])
    assert not any("optimizer_step" in e for e in runs["srlora"]["switches"])
    # the same data and start: identical until the first switch (step 2), different after it
    assert v["train_loss"][:2] == runs["srlora"]["train_loss"][:2]
    assert v["train_loss"][4:] != runs["srlora"]["train_loss"][4:]
    assert "srlora:rewarm:protect" in capsys.readouterr().out
    assert set(res["paired_vs_lora"]["methods"]) == {
        "srlora",
        "srlora:rewarm:protect",
        "dora",
        "pissa:r=2",
    }


def test_full_fine_tuning_is_plain_adamw_on_every_weight(assets_dir):
    """The study's yardstick against a hand-written loop: every parameter trained by AdamW
    (weight decay 0) at the run's lr, the head at its own lr, gradients clipped to norm 1, the
    warmup schedule, the same batches. The runner's final weights equal the loop's (fp32, 1e-6),
    after checking that training moved them."""
    import torch

    from srlora_lab.cli import build_parser
    from srlora_lab.cli.compare import build_config, prepare
    from srlora_lab.experiments import runner

    cfg = build_config(build_parser().parse_args(_args(assets_dir, "unused", "--lr", "1e-2")))
    bundle, enc, sp, _ = prepare(cfg)
    steps, bs, lr, head_lr, seed = 5, 8, 3e-3, 1e-2, 4
    got = {}
    runner.run_one(
        bundle, enc, sp, method="full", seed=seed, lr=lr, head_lr=head_lr, steps=steps,
        batch_size=bs, eval_every=steps, eval_size=8, progress=False,
        callback=lambda step, model, *a: got.update(
            {n: p.detach().clone() for n, p in model.named_parameters()} if step == steps else {}
        ),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = bundle.make(seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = [n for n, _ in model.named_parameters() if n.split(".")[0] in bundle.head]
    assert head and len(head) < len(start)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if n not in head], "lr": lr},
            {"params": [params[n] for n in head], "lr": head_lr},
        ],
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: runner.lr_factor(s, steps, 0.1, "constant")
    )
    train = runner._units(bundle, enc, sp.train)
    order = runner.batch_order(len(train), steps, bs, seed)
    torch.manual_seed(seed)
    for step in range(steps):
        inputs, labels = enc.batch(train[order[step]])
        bundle.train_mode(model)
        total, _, n = runner.loss_sums(bundle, model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        (total / n).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
    assert set(got) == set(params)
    moved = [n for n in params if not torch.equal(got[n], start[n])]
    assert len(moved) == len(params)  # every weight trained, none frozen
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-6, msg=n)
