"""SRLoRA on a 4-bit (QLoRA-style) base: bitsandbytes nf4, ``fusion="virtual"``, train, export.

The base is loaded in 4 bits with transformers' ``BitsAndBytesConfig`` and stays so, bitwise: the
SVD reads the dequantized weight, and PiSSA's residual, the fused pairs and the subtracted
directions are a small frozen side path beside it (``SRLoRAConfig(fusion="virtual")``). The
default model is a tiny random Llama (seconds on a CPU; bitsandbytes 0.50.2 runs 4-bit forward
and backward there); ``--model`` takes a hub id or a local folder of a causal LM.

    python examples/qlora_4bit.py --steps 12
    python examples/qlora_4bit.py --model <id or folder> --compute-dtype bfloat16 --steps 100
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

import srlora

TEXTS = [
    "the cat sat on the mat",
    "a dog ran under the big table",
    "the red bird sings in the morning",
    "we walk to the river after dinner",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_4bit(path, compute_dtype):
    """The causal LM at ``path`` with every linear layer but the head in nf4 (double quant)."""
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map=device, dtype=torch.float32
    )
    # on a CPU with AVX512-BF16, bitsandbytes would repack the 4-bit weights in place at the
    # first eval forward (logits() below); srlora reads the standard layout
    srlora.keep_standard_4bit_layout(base)
    return base.eval()


def tiny_llama(folder: Path) -> tuple[str, torch.Tensor]:
    """A 2-layer random Llama saved in ``folder``, and a batch of token ids for it."""
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return str(folder), torch.randint(0, 64, (4, 12))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def rel_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="hub id or local folder (default: a tiny random Llama)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", help="where the adapter and merged model go (default: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="qlora-"))
    if args.model:
        path, tok = args.model, AutoTokenizer.from_pretrained(args.model)
        ids = tok(TEXTS, padding=True, return_tensors="pt").input_ids
    else:
        path, ids = tiny_llama(out / "base")
    compute_dtype = getattr(torch, args.compute_dtype)

    base = load_4bit(path, compute_dtype)
    y_base = logits(base, ids)
    config = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        fusion="virtual",
        target_modules=TARGETS,
        total_steps=args.steps,
    )
    model, controller = srlora.wrap(base, config)  # the 4-bit weights are not written
    print(
        f"set-up keeps the 4-bit model's function: max rel. diff "
        f"{rel_max(logits(model, ids), y_base):.1e}"
    )

    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2)
    controller.attach(optimizer)
    batch = ids.to(model.device)
    for _ in range(args.steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    y = logits(model, ids)
    print(
        f"trained {args.steps} steps, {controller.num_switches} switches at "
        f"{controller.switch_steps}; change of the logits {rel_max(y, y_base):.2f}"
    )

    # a plain PEFT adapter for the same 4-bit base (the side path is folded into its factors)
    from peft import PeftModel

    srlora.export_adapter(model, controller, out / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(path, compute_dtype), out / "adapter")
    err = rel_max(logits(reloaded, ids), y)
    print(f"exported adapter on a fresh 4-bit base: max rel. diff {err:.1e}")
    # a full-precision model: dequantized base + the whole change, loadable with from_pretrained
    srlora.save_merged(model, controller, out / "merged")
    print(f"adapter: {out / 'adapter'}; merged (dequantized) model: {out / 'merged'}")
    return {
        "model": model,
        "controller": controller,
        "export_error": err,
        "out": out,
        "ids": ids,
        "logits": y,
    }


if __name__ == "__main__":
    main()
