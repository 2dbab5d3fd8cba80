"""SRLoRACallback with TRL's SFTTrainer on a causal LM (examples/trl_sft.py: a tiny random Llama).

The example itself is the run under test: it trains 12 steps (switches at 2, 4, 6, 8), saves at
5 and 10, resumes a fresh SFTTrainer from checkpoint-5 with resume_from_checkpoint=True and
exports a PEFT adapter. These tests check its objects in detail.
"""

import contextlib
import copy
import io
import re
import runpy
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer_callback import assert_same

import srlora

EXAMPLE = Path(__file__).parents[1] / "examples" / "trl_sft.py"
STEPS, SAVE = 12, 5  # r=4, r'=2, r_target=12: 4 switches at 2, 4, 6, 8; the resume point between


@pytest.fixture(scope="module")
def ex():
    return runpy.run_path(str(EXAMPLE))  # its functions (imports trl)


@pytest.fixture(scope="module")
def run(ex, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl")
    argv = ["--output-dir", str(out), "--steps", str(STEPS), "--save-steps", str(SAVE)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = ex["main"](argv)
    return {**result, "stdout": buf.getvalue()}


def test_example_prints_its_checks(run):
    assert f"trained {STEPS} optimizer steps, 4 switches at [2, 4, 6, 8]" in run["stdout"]
    assert "resumed run matches: True" in run["stdout"]
    assert "exported adapter matches: True" in run["stdout"]


def test_switches_at_the_scheduled_steps_and_checkpoints_hold_srlora_state(run):
    trainer, ctl = run["trainer"], run["controller"]
    assert trainer.model is run["model"] is ctl.model  # SFTTrainer kept the PeftModel, no re-wrap
    assert trainer.state.max_steps == ctl.total_steps == STEPS
    assert ctl.global_step == trainer.state.global_step == STEPS
    assert ctl.switch_steps == [2, 4, 6, 8] and [e["step"] for e in ctl.history] == [2, 4, 6, 8]
    assert ctl.importance_updates == STEPS
    out = Path(run["out"]) / "run"
    for step in (SAVE, 2 * SAVE):
        man = srlora.read_manifest(out / f"checkpoint-{step}" / "srlora")
        assert man["step"] == step and man["extra"]["trainer_global_step"] == step


def test_resume_continues_bitwise(run):
    """Interrupted at 5, resumed in a fresh SFTTrainer: LoRA factors, base weights, controller
    state and every logged loss bitwise equal to the uninterrupted run (fp32, CPU)."""
    m1, c1, m2, c2 = run["model"], run["controller"], run["model2"], run["controller2"]
    assert run["trainer2"].state.global_step == STEPS and c2.history[0]["step"] == 2
    assert_same(m1, c1, m2, c2)  # every parameter (LoRA and the fused base weights), controller
    l1 = {h["step"]: h["loss"] for h in run["trainer"].state.log_history if "loss" in h}
    l2 = {h["step"]: h["loss"] for h in run["trainer2"].state.log_history if "loss" in h}
    assert sorted(l1) == list(range(1, STEPS + 1)) and l1 == l2
    # the base weights did change (the switches fused pairs into them): comparing them matters
    base = dict(run["base"].named_parameters())
    fused = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in m1.named_parameters()
        if ".base_layer." in k
    }
    assert len(fused) == 4
    assert all(not torch.equal(v, base[k]) for k, v in fused.items())


def test_exported_adapter_reproduces_the_trained_model(run):
    from peft import PeftModel

    model, tok, base = run["model"], run["tokenizer"], run["base"]
    g = torch.Generator().manual_seed(1)  # fresh inputs, not the training texts
    ids = torch.randint(3, tok.vocab_size, (3, 10), generator=g)
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        y_base = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(Path(run["out"]) / "adapter"))
        y_peft = loaded.eval()(input_ids=ids).logits
    rel = float((y_peft - y).double().norm() / y.double().norm())
    assert rel <= 1e-5, rel  # fp32
    assert float((y_base - y).double().norm() / y.double().norm()) > 100 * rel


def test_trainer_save_model_alone_does_not_rebuild_the_model(run, tmp_path):
    """What the docs warn about: trainer.save_model() writes the live LoRA factors, which belong
    to the fused base weights; on the original base they give another model."""
    from peft import PeftModel

    model, base = run["model"], run["base"]
    run["trainer"].save_model(str(tmp_path / "live"))
    ids = torch.randint(
        3, run["tokenizer"].vocab_size, (3, 10), generator=torch.Generator().manual_seed(3)
    )
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        wrong = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "live")).eval()
        y_wrong = wrong(input_ids=ids).logits
    assert float((y_wrong - y).double().norm() / y.double().norm()) > 1e-3


def test_merged_model_reproduces_the_trained_model(run, tmp_path):
    """save_merged deep-copies the model, whose forward SFTTrainer patched (a fused LM head
    bound to the original); the saved weights are what matters and must be right."""
    from transformers import LlamaForCausalLM

    model, ctl = run["model"], run["controller"]
    srlora.save_merged(model, ctl, tmp_path / "merged")
    ids = torch.randint(
        3, run["tokenizer"].vocab_size, (3, 10), generator=torch.Generator().manual_seed(2)
    )
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        y_merged = merged(input_ids=ids).logits
    assert float((y_merged - y).double().norm() / y.double().norm()) <= 1e-5


def test_sftconfig_defaults_keep_the_adapter_and_steps_come_from_the_dataloader(ex, tmp_path):
    """SFTConfig's defaults (bf16=True, gradient_checkpointing=True), max_steps unset: SFTTrainer
    neither re-initializes nor casts the SRLoRA adapter, and the schedule is read from the
    dataloader's length (16 texts / batch 4 = 4 steps per epoch, 3 epochs = 12 steps)."""
    base, tok = ex["tiny_model_and_tokenizer"]()
    ref, _ = srlora.wrap(
        copy.deepcopy(base),
        srlora.SRLoRAConfig(
            r=4, lora_alpha=8, r_target=12, gamma=0.5, target_modules=["q_proj", "v_proj"]
        ),
    )
    trainer, model, ctl = ex["build"](base, tok, str(tmp_path), -1, 1000, bf16=None, epochs=3)
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing
    p_ref, p = dict(ref.named_parameters()), dict(model.named_parameters())
    assert p.keys() == p_ref.keys()
    for k in p:
        assert torch.equal(p[k], p_ref[k]) and p[k].dtype == torch.float32, k
        assert p[k].requires_grad == p_ref[k].requires_grad, k
    trainer.train()
    assert trainer.state.max_steps == ctl.total_steps == 12 == ctl.global_step
    assert [e["step"] for e in ctl.history] == [2, 4, 6, 8]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_peft_config_beside_an_srlora_model_is_refused(ex, tmp_path):
    """SFTTrainer's own peft_config path would build a second adapter; TRL refuses the mix."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    base, tok = ex["tiny_model_and_tokenizer"]()
    _, model, _ = ex["build"](base, tok, str(tmp_path), 2, 1)
    with pytest.raises(ValueError, match="PeftModel.*peft_config"):
        SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
            train_dataset=ex["Dataset"].from_dict({"text": ex["TEXTS"]}),
            processing_class=tok,
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )


def test_usage_doc_trl_block_is_the_example_code():
    """docs/usage.md's TRL block (the README's snippets: tests/test_readme.py)."""
    readme = (EXAMPLE.parents[1] / "docs" / "usage.md").read_text()
    section = readme[readme.index("## Fine-tune an LLM") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "SFTTrainer(" in block and "SRLoRACallback(controller)" in block
    assert textwrap.indent(block, "    ") in EXAMPLE.read_text()  # the body of build()
