"""SRLoRAConfig.switch_schedule: "fixed" (the paper) and "adaptive" (switch when the ranking has
settled or the loss has plateaued, within the fixed schedule's budget). The decisions are checked
against a loop reference on the scores and losses a real run saw; resume must fire the same
switches at the same steps, bitwise."""

import math

import pytest
import torch
from conftest import TinyNet, rel
from test_checkpoint import assert_same_run, make_run, seed_all

import srlora
from srlora.schedule import AdaptiveSchedule


@pytest.mark.parametrize(
    "field, value",
    [
        ("switch_schedule", "sometimes"),
        ("exhaustion", "wrap"),
        ("adaptive_window", 0),
        ("adaptive_window", 2.5),
        ("adaptive_settled", 0.0),
        ("adaptive_settled", 1.5),
        ("adaptive_plateau", -0.1),
        ("adaptive_plateau", float("nan")),
        ("switch_span", 0.0),
        ("switch_span", 1.5),
        ("switch_span", float("nan")),
        ("switch_span", True),
    ],
)
def test_bad_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"SRLoRAConfig.{field}"):
        srlora.SRLoRAConfig(**{field: value})


def test_paper_pins_the_fixed_schedule_and_stop():
    cfg = srlora.SRLoRAConfig.paper(r=4, r_target=8)
    assert (cfg.switch_schedule, cfg.exhaustion) == ("fixed", "stop")
    with pytest.raises(ValueError, match="fixed by the paper"):
        srlora.SRLoRAConfig.paper(switch_schedule="adaptive")


def test_adaptive_needs_total_steps():
    torch.manual_seed(0)
    model, ctl = srlora.wrap(
        TinyNet(),
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=8,
            target_modules=["query"],
            switch_interval=2,
            switch_schedule="adaptive",
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="switch_schedule='adaptive' needs total_steps"):
        ctl.attach(opt)


# ---------------------------------------------------------------------- the decision alone
def simulate(losses, window=5, total=100, settled=None):
    """Drive an AdaptiveSchedule with a stub controller (no ranking update: ``updated=False``)
    through ``total`` steps, feeding ``losses[t-1]`` (None: no loss) before step t."""
    cfg = srlora.SRLoRAConfig(
        r=4, r_target=12, total_steps=total, switch_schedule="adaptive", adaptive_window=window
    )  # N = 4, fixed interval 20
    sched = AdaptiveSchedule(cfg, 2)
    fired = []
    for t in range(1, total + 1):
        if losses[t - 1] is not None:
            sched.observe_loss(losses[t - 1])
        reason = sched.decide(t, total, False, None, lambda: [True, True])
        if reason:
            fired.append((t, reason))
            sched.switched(t, True)
    return fired


def test_forced_switches_without_any_signal():
    # interval 20: min gap 10, max gap 40; 4 switches must fit before step 100 - 10
    assert simulate([None] * 100) == [
        (40, "max-interval"),
        (70, "deadline"),
        (80, "deadline"),
        (90, "deadline"),
    ]
    falling = [100 * 0.5**t for t in range(100)]  # always improving: never a plateau
    assert simulate(falling) == simulate([None] * 100)
    assert simulate([float("nan")] * 100) == simulate([None] * 100)  # non-finite: ignored


def test_loss_plateau_fires_after_the_window_and_the_min_gap():
    # a flat loss: plateau once window+1 = 6 losses are seen since the last switch and the
    # min gap (10) has passed; the budget (4) is never exceeded
    assert simulate([1.0] * 100) == [(t, "loss-plateau") for t in (10, 20, 30, 40)]
    assert simulate([1.0] * 100, window=14) == [(t, "loss-plateau") for t in (15, 30, 45, 60)]


# ---------------------------------------------------------------------- a real run vs a reference
def reference(keys, losses, cfg, total, switchable):
    """Loop reference of the adaptive decision from the per-step pair scores and losses."""
    W, k = cfg.adaptive_window, cfg.r_prime
    N = cfg.num_switches
    interval = total // (N + 1)
    lo, hi = max(1, math.ceil(interval / 2)), max(1, math.ceil(interval / 2), 2 * interval)
    last, fired, sets, runs, ema, hist, out = 0, 0, None, None, None, [], []
    b = 1 - 2 / (W + 1)
    for t, (scores, loss) in enumerate(zip(keys, losses), 1):
        ema = loss if ema is None else b * ema + (1 - b) * loss
        hist = (hist + [ema])[-(W + 1) :]
        if fired >= N:
            continue
        gap = t - last
        if gap >= lo - W:
            new = [
                sorted(sorted(range(len(s)), key=lambda j: (float(s[j]), j))[:k]) for s in scores
            ]
            runs = (
                [1] * len(new)
                if sets is None
                else [r + 1 if a == c else 1 for r, a, c in zip(runs, new, sets)]
            )
            sets = new
        if gap < lo or t > total - lo:
            continue
        live = [i for i, ok in enumerate(switchable) if ok]
        reason = None
        if sets is not None and sum(runs[i] >= W for i in live) / len(live) >= cfg.adaptive_settled:
            reason = "ranking-settled"
        elif len(hist) == W + 1 and hist[0] - hist[-1] < cfg.adaptive_plateau * abs(hist[0]):
            reason = "loss-plateau"
        elif gap >= hi:
            reason = "max-interval"
        elif t >= total - (N - fired) * lo:
            reason = "deadline"
        if reason:
            out.append((t, reason))
            last, fired, sets, runs, hist = t, fired + 1, None, None, []
    return out


def record_switches(model, ctl) -> list:
    """Wrap ``ctl.switch_now``: each switch appends (output before, output after, how many
    trainable tensors it changed) on a fixed probe batch."""
    probe = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    real_switch, outputs = ctl.switch_now, []
    trainable = [p for p in model.parameters() if p.requires_grad]

    def switch(*a, **kw):
        with torch.no_grad():
            y0, p0 = model(probe).clone(), [p.clone() for p in trainable]
            n = real_switch(*a, **kw)
            changed = sum(int(not torch.equal(p, q)) for p, q in zip(trainable, p0))
            outputs.append((y0, model(probe).clone(), changed))
        return n

    ctl.switch_now = switch
    return outputs


def adaptive_run(r, settled, plateau, lr):
    """A real adaptive run checked against the reference; returns the reasons it fired."""
    total = 60
    torch.manual_seed(0)
    cfg = srlora.SRLoRAConfig(
        r=r,
        lora_alpha=2 * r,
        r_target=3 * r,
        gamma=0.5,
        total_steps=total,
        target_modules=["query", "value"],
        svd_method="exact",
        switch_schedule="adaptive",
        adaptive_window=3,
        adaptive_settled=settled,
        adaptive_plateau=plateau,
    )
    model, ctl = srlora.wrap(TinyNet(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctl.attach(opt)
    keys, losses = [], []
    real_decide = ctl.schedule.decide
    outputs = record_switches(model, ctl)

    def decide(step, total, updated, would_fuse, switchable):
        assert updated
        keys.append([ctl.pair_scores(i).clone() for i in range(len(ctl.layers))])
        return real_decide(step, total, updated, would_fuse, switchable)

    ctl.schedule.decide = decide
    g = torch.Generator().manual_seed(1)
    for _ in range(total):
        loss = model(torch.randn(8, 32, generator=g)).pow(2).mean()
        loss.backward()
        ctl.observe_loss(loss)
        losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    fired = [(e["step"], e["reason"]) for e in ctl.history]
    assert fired == reference(keys, losses, cfg, total, [True, True])
    assert 1 <= len(fired) <= cfg.num_switches
    for y0, y1, _ in outputs:
        assert rel(y1, y0) <= 1e-5
    return {r for _, r in fired}


def test_real_runs_fire_what_the_reference_decides_and_keep_the_output():
    seen = set()
    for r, settled, plateau, lr in [
        (4, 0.5, 0.01, 1e-2),
        (8, 1.0, 1.0, 3e-2),
        (4, 1.0, 1e-6, 1e-2),
    ]:
        seen |= adaptive_run(r, settled, plateau, lr)
    assert {"ranking-settled", "loss-plateau"} <= seen, seen


def test_fixed_schedule_records_its_reason_and_manual_switches_theirs():
    torch.manual_seed(0)
    model, ctl = srlora.wrap(
        TinyNet(),
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query"], total_steps=10
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    for _ in range(4):
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        opt.zero_grad()
    ctl.switch_now()
    assert [(e["step"], e["reason"]) for e in ctl.history] == [
        (2, "fixed"),
        (4, "fixed"),
        (4, "manual"),
    ]


def test_switch_span_puts_every_switch_in_the_first_part_of_the_run_and_keeps_the_output():
    """switch_span=0.5: the N = 4 switches at k * floor(0.5 * 40 / 4) = 5, 10, 15, 20 (the
    paper's spread: 8, 16, 24, 32), each leaving the output unchanged (fp32, 1e-5), and none
    after; refused with switch_interval, with the adaptive schedule and without total_steps."""
    from srlora.factors import switch_steps

    assert switch_steps(40, 4, None) == [8, 16, 24, 32]
    assert switch_steps(40, 4, None, span=0.5) == [5, 10, 15, 20]
    assert switch_steps(300, 6, None, span=0.7) == [35, 70, 105, 140, 175, 210]
    assert switch_steps(40, 4, None, span=1.0) == [10, 20, 30, 40]
    with pytest.raises(ValueError, match="too short for 4 switches"):
        switch_steps(6, 4, None, span=0.5)
    for kw in (dict(switch_interval=3), dict(switch_schedule="adaptive", total_steps=40)):
        with pytest.raises(ValueError, match="SRLoRAConfig.switch_span"):
            srlora.SRLoRAConfig(switch_span=0.5, **kw)
    torch.manual_seed(0)
    model, ctl = srlora.wrap(
        TinyNet(),
        srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=12,
            target_modules=["query", "value"],
            svd_method="exact",
            switch_span=0.5,
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match="switch_span needs total_steps"):
        ctl.attach(opt)
    ctl.set_total_steps(40)
    ctl.attach(opt)
    assert ctl.switch_steps == [5, 10, 15, 20]
    outputs = record_switches(model, ctl)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        model(torch.randn(8, 32, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert [(e["step"], e["reason"]) for e in ctl.history] == [
        (t, "fixed") for t in (5, 10, 15, 20)
    ]
    assert len(outputs) == 4
    for y0, y1, changed in outputs:
        assert changed > 0 and rel(y1, y0) <= 1e-5  # the factors moved, the output did not


# ---------------------------------------------------------------------- resume
def train_with_loss(model, ctl, opt, sched, start, stop):
    import numpy as np

    for t in range(start, stop):
        ids = torch.from_numpy(np.random.RandomState(t).randint(0, 100, size=(4, 8)))
        labels = torch.tensor([t % 2, 1, 0, (t // 2) % 2])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        ctl.observe_loss(loss)
        opt.step()
        sched.step()
        opt.zero_grad()


@pytest.mark.parametrize("exhaustion", ["stop", "refresh"])
def test_resume_fires_the_same_switches_at_the_same_steps(tmp_path, exhaustion):
    kw = dict(
        switch_schedule="adaptive",
        adaptive_window=2,
        adaptive_settled=0.75,
        r_target=8 if exhaustion == "refresh" else 12,
        exhaustion=exhaustion,
    )
    if exhaustion == "refresh":
        kw["switch_interval"] = 2  # budget: every 2 steps to the end, 5 switches
    seed_all(1)
    straight = make_run(**kw)
    train_with_loss(*straight, 0, 12)
    fired = [(e["step"], e["reason"]) for e in straight[1].history]
    assert len(fired) >= 3 and fired[1][0] <= 7 < fired[-1][0]  # switches before and after
    seed_all(1)
    first = make_run(**kw)
    train_with_loss(*first, 0, 7)
    srlora.save_checkpoint(
        tmp_path / "ck", model=first[0], controller=first[1], optimizer=first[2], scheduler=first[3]
    )
    train_with_loss(*first, 7, 9)  # the interrupted process runs on, then dies
    del first
    seed_all(123)
    resumed = make_run(**kw)
    srlora.load_checkpoint(
        tmp_path / "ck",
        model=resumed[0],
        controller=resumed[1],
        optimizer=resumed[2],
        scheduler=resumed[3],
    )
    train_with_loss(*resumed, 7, 12)
    assert_same_run(straight, resumed)
    a, b = straight[1].state_dict()["schedule"], resumed[1].state_dict()["schedule"]
    assert {k: v for k, v in a.items() if not torch.is_tensor(v)} == {
        k: v for k, v in b.items() if not torch.is_tensor(v)
    }
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    if exhaustion == "refresh":
        assert any(e["refreshed"] for e in straight[1].history)


# ---------------------------------------------------------------------- the Trainer callback
def adaptive_trainer(out):
    from test_trainer_callback import Synthetic
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_bert
    from srlora.integrations import SRLoRACallback

    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        svd_method="exact",
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        switch_schedule="adaptive",
        adaptive_window=2,
        adaptive_settled=1.0,
        adaptive_plateau=0.5,
    )
    model, ctl = srlora.wrap(tiny_bert(), cfg)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=16,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        save_strategy="steps",
        save_steps=7,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return (
        Trainer(model=model, args=args, train_dataset=Synthetic(), callbacks=[SRLoRACallback(ctl)]),
        model,
        ctl,
    )


def test_trainer_feeds_the_logged_loss_and_resumes_the_schedule_exactly(tmp_path):
    trainer, model, ctl = adaptive_trainer(tmp_path / "full")
    trainer.train()
    fired = [(e["step"], e["reason"]) for e in ctl.history]
    assert ctl.schedule.detector.loss_ema is not None and "loss-plateau" in {r for _, r in fired}
    assert fired[0][0] <= 7 < fired[-1][0]
    trainer2, model2, ctl2 = adaptive_trainer(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-7"))
    assert ctl2.history == ctl.history
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert ctl2.schedule.detector.loss_ema == ctl.schedule.detector.loss_ema


# ---------------------------------------------------------------------- srlora compare, study spec
def test_study_spec_takes_the_variants_and_refuses_bad_values_by_key():
    from test_study import base_spec

    from srlora_lab.experiments import study_spec

    spec = study_spec.parse(
        base_spec(
            methods=[
                "srlora",
                {
                    "name": "srlora-adaptive",
                    "method": "srlora",
                    "switch_schedule": "adaptive",
                    "adaptive_window": 5,
                },
                {
                    "name": "srlora-refresh",
                    "method": "srlora",
                    "exhaustion": "refresh",
                    "switch_interval": 10,
                },
            ]
        )
    )
    assert [m["config"] for m in spec["methods"]] == [
        {},
        {"switch_schedule": "adaptive", "adaptive_window": 5},
        {"exhaustion": "refresh", "switch_interval": 10},
    ]
    with pytest.raises(study_spec.SpecError, match=r"methods\[0\].adaptive_settled"):
        study_spec.parse(
            base_spec(methods=[{"name": "x", "method": "srlora", "adaptive_settled": 2}])
        )


def _compare_assets(tmp_path):
    from test_compare_cli import synthetic_csv, tiny_model

    return {"model": tiny_model(str(tmp_path / "m")), "csv": synthetic_csv(str(tmp_path / "d.csv"))}


def test_compare_refuses_bad_variant_fields_with_exit_2(tmp_path, capsys):
    from test_compare_cli import _args

    from srlora_lab.cli import main

    a = {"model": str(tmp_path / "no-model-needed"), "csv": str(tmp_path / "no-data-needed.csv")}
    for bad, msg in [
        ("srlora:switch_schedule=often", "SRLoRAConfig.switch_schedule"),
        ("srlora:adaptive_window=0", "SRLoRAConfig.adaptive_window"),
        ("srlora:method=lora", "not a setting a method can take"),
        ("srlora:exhaustion", "'exhaustion' is not a known setting"),
    ]:
        assert main(_args(a, tmp_path / "o2", "--methods", bad)) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "o2").exists()


@pytest.mark.slow  # ~15-30 s: a tiny BERT compare run, its plots
def test_compare_runs_the_variants_and_records_why_each_switch_fired(tmp_path):
    import json

    from test_compare_cli import _args

    from srlora_lab.cli import main

    out = tmp_path / "out"
    args = _args(
        _compare_assets(tmp_path),
        out,
        "--seeds",
        "0",
        "--r-target",
        "8",
        "--methods",
        "srlora:adaptive:refresh:switch_interval=2:adaptive_window=2",
    )
    assert main(args) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["config"] == {
        "switch_schedule": "adaptive",
        "exhaustion": "refresh",
        "switch_interval": 2,
        "adaptive_window": 2,
    }
    reasons = {s["reason"] for s in run["switches"]}
    assert reasons and "fixed" not in reasons and "manual" not in reasons
    assert any(s["refreshed"] for s in run["switches"])  # r_target 8: refreshed past it


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    """The python block of docs/algorithm.md's schedule section runs and prints what it says."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "algorithm.md").read_text()
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S)
        if 'switch_schedule="adaptive"' in b
    ]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(blocks[0], "docs/algorithm.md", "exec"), ns)
    out = capsys.readouterr().out
    printed = (
        "[(4, 'ranking-settled', False), (12, 'loss-plateau', False), "
        "(16, 'loss-plateau', True),\n(20, 'ranking-settled', False)]"
    )
    assert f"prints `{printed}`" in doc  # the doc quotes the output (wrapped) ...
    assert printed.replace("\n", " ") in out  # ... that the example prints
    assert "pointer 12 of 12 cached directions" in out
    assert ns["result"].error == 0.0 and (tmp_path / "adaptive-adapter").is_dir()


def test_a_state_without_the_detector_is_refused_and_nothing_changes():
    seed_all(1)
    run = make_run(switch_schedule="adaptive", adaptive_window=2)
    train_with_loss(*run, 0, 5)
    sd = run[1].state_dict()
    fresh = make_run(switch_schedule="adaptive", adaptive_window=2)
    for broken in (
        {k: v for k, v in sd.items() if k != "schedule"},
        dict(sd, schedule=dict(sd["schedule"], runs=[1, 2])),
    ):
        with pytest.raises(srlora.CheckpointMismatchError, match="adaptive schedule"):
            fresh[1].load_state_dict(broken)
        assert fresh[1].global_step == 0 and fresh[1].schedule.detector.fired == 0
