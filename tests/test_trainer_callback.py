"""SRLoRACallback with a real transformers.Trainer on a tiny BERT."""

import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

import srlora
from srlora import CheckpointMismatchError
from srlora.integrations import SRLoRACallback

MAX_STEPS = 12  # r=4, r'=2, r_target=12: switches at 2, 4, 6, 8


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 100, (n, 8), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def make_trainer(
    out, max_steps=MAX_STEPS, save_steps=5, ga=1, max_grad_norm=1.0, extra_cb=(), logging_steps=1000
):
    from transformers import Trainer, TrainingArguments

    base = tiny_bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        svd_method="exact",
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model, ctl = srlora.wrap(base, cfg)  # total_steps unset: the callback reads max_steps
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        learning_rate=2e-2,
        lr_scheduler_type="linear",
        max_grad_norm=max_grad_norm,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=logging_steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Synthetic(),
        callbacks=[SRLoRACallback(ctl), *extra_cb],
    )
    return trainer, model, ctl


def assert_same(m1, c1, m2, c2):
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    s1, s2 = c1.state_dict(), c2.state_dict()
    assert s1["history"] == s2["history"]
    assert (s1["global_step"], s1["num_switches"]) == (s2["global_step"], s2["num_switches"])
    for name, m in s1["modules"].items():
        for k, v in m.items():
            w = s2["modules"][name][k]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w, (name, k)
    for k, v in s1["importance"].items():
        assert torch.equal(v, s2["importance"][k]), k


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer, model, ctl = make_trainer(out)
    before = [(L.W() + L.scaling * L.B() @ L.A()).clone() for L in ctl.layers]
    trainer.train()
    return out, trainer, model, ctl, before


def test_full_run_counts_steps_and_switches(full_run):
    out, trainer, model, ctl, before = full_run
    assert trainer.state.max_steps == MAX_STEPS and ctl.total_steps == MAX_STEPS
    assert ctl.global_step == trainer.state.global_step == MAX_STEPS
    assert [e["step"] for e in ctl.history] == [2, 4, 6, 8]
    assert ctl.importance_updates == MAX_STEPS
    after = [L.W() + L.scaling * L.B() @ L.A() for L in ctl.layers]
    assert min(float((a - b).norm() / b.norm()) for a, b in zip(after, before)) > 1e-2
    for step in (5, 10):
        man = srlora.read_manifest(out / f"checkpoint-{step}" / "srlora")
        assert man["step"] == step and man["extra"]["trainer_global_step"] == step


@pytest.mark.parametrize("where", ["elsewhere", "output_dir"])
def test_resumed_run_continues_exactly(full_run, tmp_path, where):
    out, _, model, ctl, _ = full_run
    if where == "elsewhere":  # an explicit path outside the new run's output_dir
        trainer, m2, c2 = make_trainer(tmp_path / "new")
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-5"))
    else:  # resume_from_checkpoint=True: the last checkpoint in output_dir
        shutil.copytree(out / "checkpoint-5", tmp_path / "run" / "checkpoint-5")
        trainer, m2, c2 = make_trainer(tmp_path / "run")
        trainer.train(resume_from_checkpoint=True)
    assert c2.history[0]["step"] == 2  # restored history, switches before the resume point
    assert_same(model, ctl, m2, c2)


def test_resume_without_srlora_state_raises(full_run, tmp_path):
    out = full_run[0]
    shutil.copytree(out / "checkpoint-5", tmp_path / "run" / "checkpoint-5")
    shutil.rmtree(tmp_path / "run" / "checkpoint-5" / "srlora")
    trainer, _, _ = make_trainer(tmp_path / "run")
    with pytest.raises(CheckpointMismatchError, match="no SRLoRA state was found"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_with_state_of_another_step_raises(full_run, tmp_path):
    out = full_run[0]
    shutil.copytree(out / "checkpoint-5", tmp_path / "run" / "checkpoint-5")
    shutil.rmtree(tmp_path / "run" / "checkpoint-5" / "srlora")
    shutil.copytree(out / "checkpoint-10" / "srlora", tmp_path / "run" / "checkpoint-5" / "srlora")
    trainer, _, _ = make_trainer(tmp_path / "run")
    with pytest.raises(
        CheckpointMismatchError, match="saved at Trainer step 10.*resumes at step 5"
    ):
        trainer.train(resume_from_checkpoint=True)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    trainer, _, ctl = make_trainer(tmp_path, max_steps=6, save_steps=100, ga=3)
    trainer.train()
    assert ctl.global_step == trainer.state.global_step == 6
    assert ctl.importance_updates == 6
    assert ctl.total_steps == 6 and ctl.switch_steps == [1, 2, 3, 4]
    assert [e["step"] for e in ctl.history] == [1, 2, 3, 4]


def test_importance_sees_clipped_gradients(tmp_path):
    from transformers import TrainerCallback

    seen = {}

    class Spy(TrainerCallback):  # after optimizer.step (and SRLoRA's post-hook), before zero_grad
        def on_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                imp = ctl.importance
                seen["ibar"] = imp.flat_state()["ibar"].clone()
                seen["I"] = torch.cat(
                    [(p.detach() * p.grad).abs().flatten() for p in imp.params.values()]
                )
                grads = [p.grad for p in kw["model"].parameters() if p.grad is not None]
                seen["norm"] = float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads])
                    )
                )

    trainer, _, ctl = make_trainer(
        tmp_path,
        max_steps=10,
        save_steps=100,
        max_grad_norm=1e-3,
        extra_cb=[Spy()],
        logging_steps=1,
    )
    trainer.train()
    assert trainer.state.log_history[0]["grad_norm"] > 1e-1  # the raw norm, before clipping
    assert seen["norm"] <= 1e-3 * (1 + 1e-4)  # what optimizer.step and SRLoRA saw: clipped
    assert ctl.switch_steps[0] == 2  # no switch (importance reset) right after step 1
    expected = (1 - ctl.config.beta1) * seen["I"]
    assert seen["I"].abs().max() > 0
    assert torch.allclose(seen["ibar"], expected, rtol=1e-6, atol=0)


def test_load_best_model_at_end_restores_matching_fused_state(tmp_path):

    trainer, model, ctl = make_trainer(tmp_path, max_steps=10, save_steps=5)
    # evaluate at 5 and 10 with a metric that makes step 5 the best
    trainer.args.eval_strategy = "steps"
    trainer.args.eval_steps = 5
    trainer.args.load_best_model_at_end = True
    trainer.args.metric_for_best_model = "loss"
    trainer.args.greater_is_better = False
    trainer.eval_dataset = Synthetic(8)
    calls = []

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        loss = out.loss if model.training else out.loss * 0 + (len(calls) + 1.0)
        if not model.training:
            calls.append(1)
        return (loss, out) if return_outputs else loss

    trainer.compute_loss = compute_loss
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-5")
    assert ctl.global_step == 5  # the fused state of the best checkpoint, with its adapter
    ref_trainer, ref_model, ref_ctl = make_trainer(tmp_path / "ref", max_steps=10, save_steps=100)
    ref_ctl.set_total_steps(10)
    srlora.load_checkpoint(
        tmp_path / "checkpoint-5" / "srlora", model=ref_model, controller=ref_ctl, restore_rng=False
    )
    assert_same(model, ctl, ref_model, ref_ctl)


def test_example_script_runs(tmp_path, monkeypatch, capsys):
    script = Path(__file__).parents[1] / "examples" / "trainer_example.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--output-dir", str(tmp_path), "--steps", "12"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "resumed run matches: True" in out
    assert "exported adapter matches: True" in out


def test_attach_unwraps_accelerate_optimizer():
    """Core fix: AcceleratedOptimizer subclasses torch.optim.Optimizer; attach() must hook the
    optimizer inside it (the wrapper has no step-hook registry of its own)."""
    from accelerate.optimizer import AcceleratedOptimizer

    model, ctl = srlora.wrap(
        tiny_bert(),
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, target_modules=["query", "value"], total_steps=6
        ),
    )
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped = AcceleratedOptimizer(inner, device_placement=False)
    assert isinstance(wrapped, torch.optim.Optimizer)
    ctl.attach(wrapped)
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=x).logits.pow(2).mean().backward()
        wrapped.step()
        wrapped.zero_grad()
    assert ctl.global_step == 2 and ctl.importance_updates == 2


@pytest.mark.parametrize("layout", ["output_dir", "explicit"])
def test_resume_without_the_trainer_path(full_run, tmp_path, monkeypatch, layout):
    """If the Trainer's resume path cannot be read, output_dir/checkpoint-<step> is used, or
    the path given as SRLoRACallback(resume_from=...)."""
    from srlora.integrations import trainer as integration

    monkeypatch.setattr(integration, "_trainer_resume_path", lambda: None)
    out, _, model, ctl, _ = full_run
    if layout == "output_dir":
        shutil.copytree(out / "checkpoint-5", tmp_path / "run" / "checkpoint-5")
        trainer, m2, c2 = make_trainer(tmp_path / "run")
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer, m2, c2 = make_trainer(tmp_path / "new")
        explicit = SRLoRACallback(c2, resume_from=str(out / "checkpoint-5"))
        trainer.callback_handler.callbacks = [
            explicit if isinstance(cb, SRLoRACallback) else cb
            for cb in trainer.callback_handler.callbacks
        ]
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-5"))
    assert_same(model, ctl, m2, c2)


def test_second_fresh_train_on_a_used_controller_is_refused(tmp_path):
    trainer, _, ctl = make_trainer(tmp_path, max_steps=5, save_steps=100)
    trainer.train()
    with pytest.raises(ValueError, match="already counted 5 optimizer steps"):
        trainer.train()
