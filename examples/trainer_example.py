"""SRLoRA in a Hugging Face Trainer: train, resume exactly, export a plain PEFT adapter, merge.

Runs on a CPU in seconds: a tiny randomly initialised BERT and a synthetic task (is the first
token's id above 50?). The only SRLoRA-specific lines are ``srlora.wrap`` and the callback;
everything else is an ordinary Trainer script.

    python examples/trainer_example.py --output-dir /tmp/srlora-trainer --steps 40
"""

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import srlora
from srlora.integrations import SRLoRACallback


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 100, (n, 8), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def base_model():
    """The 'pretrained' model: the same weights every call (seeded)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
    ).eval()


def build(output_dir, steps):
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )  # total_steps: from the Trainer
    model, controller = srlora.wrap(base_model(), cfg)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        save_steps=steps // 2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Synthetic(), callbacks=[SRLoRACallback(controller)]
    )
    return trainer, model, controller


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    out = a.output_dir or tempfile.mkdtemp(prefix="srlora-trainer-")

    # 1. an ordinary training run; checkpoints at steps/2 and steps include SRLoRA's state
    trainer, model, controller = build(f"{out}/run", a.steps)
    trainer.train()
    print(
        f"trained {controller.global_step} optimizer steps, {controller.num_switches} "
        f"switches at {controller.switch_steps}"
    )

    # 2. a new process would do this: fresh objects, resume from the mid-run checkpoint
    trainer2, model2, controller2 = build(f"{out}/run", a.steps)
    trainer2.train(resume_from_checkpoint=f"{out}/run/checkpoint-{a.steps // 2}")
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    print(f"resumed run matches: {same}")

    # 3. a plain PEFT adapter on the ORIGINAL base model, and a merged model
    from peft import PeftModel

    result = srlora.export_adapter(model, controller, f"{out}/adapter")
    small = srlora.export_adapter(model, controller, f"{out}/adapter-r8", rank=8)
    srlora.save_merged(model, controller, f"{out}/merged")
    x = Synthetic(16).x
    model.eval()
    with torch.no_grad():
        y = model(input_ids=x).logits
        y_peft = (
            PeftModel.from_pretrained(base_model(), f"{out}/adapter").eval()(input_ids=x).logits
        )
        y_merged = (
            BertForSequenceClassification.from_pretrained(f"{out}/merged")
            .eval()(input_ids=x)
            .logits
        )
    err = float((y_peft - y).norm() / y.norm())
    print(f"exported adapter: rank {result.rank}, output rel. diff {err:.1e}")
    print(f"exported adapter matches: {err <= 1e-4}")
    print(f"rank-8 adapter: delta rel. error {small.error:.3f}")
    print(f"merged model output rel. diff {float((y_merged - y).norm() / y.norm()):.1e}")
    print(f"files under {out}")


if __name__ == "__main__":
    main()
