"""Checkpoint, exact resume and export of an SRLoRA run, in a plain training loop.

A tiny randomly initialised BERT on a synthetic task, on a CPU in seconds: train half the run,
save a checkpoint, load it into fresh objects, finish both copies (they stay bitwise equal), then
export a plain PEFT adapter for the ORIGINAL base model and a merged model, and check both
reproduce the trained model.

    python examples/checkpoint_export.py
"""

import tempfile

import torch
from peft import PeftModel
from transformers import BertForSequenceClassification

import srlora
from trainer_example import Synthetic, base_model


def build(steps):
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=16,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        total_steps=steps,
    )
    model, controller = srlora.wrap(base_model(), cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller.attach(optimizer)
    return model, controller, optimizer


def train(model, optimizer, batches):
    for b in batches:
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(steps=24):
    data = Synthetic()
    batches = [
        {"input_ids": data.x[i : i + 8], "labels": data.y[i : i + 8]}
        for i in range(0, steps * 8, 8)
        for i in [i % 56]
    ]
    out = tempfile.mkdtemp(prefix="srlora-ckpt-")
    model, controller, optimizer = build(steps)
    train(model, optimizer, batches[: steps // 2])
    model2, controller2, optimizer2 = build(steps)  # a new process would build fresh objects
    srlora.save_checkpoint(f"{out}/ckpt", model=model, controller=controller, optimizer=optimizer)
    srlora.load_checkpoint(
        f"{out}/ckpt", model=model2, controller=controller2, optimizer=optimizer2
    )
    train(model, optimizer, batches[steps // 2 :])
    train(model2, optimizer2, batches[steps // 2 :])
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    result = srlora.export_adapter(model, controller, f"{out}/adapter")  # plain PEFT, original base
    srlora.save_merged(model, controller, f"{out}/merged")  # from_pretrained-loadable
    x = data.x[:16]
    with torch.no_grad():
        want = model(input_ids=x).logits
        peft = PeftModel.from_pretrained(base_model(), f"{out}/adapter")(input_ids=x).logits
        merged = BertForSequenceClassification.from_pretrained(f"{out}/merged")(input_ids=x).logits
    rel = lambda a: float((a - want).norm() / want.norm())
    print(
        f"{controller.num_switches} switches; resumed run bitwise equal: {same}; exported "
        f"rank {result.rank}; adapter rel. difference {rel(peft):.1e}; merged "
        f"{rel(merged):.1e}"
    )
    return same, rel(peft), rel(merged)


if __name__ == "__main__":
    main()
