"""Median time of ``controller.switch_now()`` on a small Llama-shaped model, for before/after runs.

Uses only the public API (``srlora.wrap``, ``SRLoRAConfig``, ``switch_now``), so the same script
times any commit: check the old one out in a worktree and put its ``src`` first on PYTHONPATH:

    git worktree add /tmp/old 9efa649
    PYTHONPATH=/tmp/old/src python benchmarks/switch_time.py    # before
    PYTHONPATH=src python benchmarks/switch_time.py             # this tree

The model: Llama with random weights (default hidden 512, 4 layers, intermediate 1408, bf16),
r = 8 on all 7 projections (28 modules), r_target 64 (14 switches of r' = 4), two AdamW steps so
that importance and optimizer state exist, then every switch timed.
"""
import argparse
import statistics
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--intermediate", type=int, default=1408)
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--r-target", type=int, default=64)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--device", default="cpu")
a = p.parse_args()
torch.set_num_threads(a.threads)

import srlora  # noqa: E402  (after the thread setting)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

dev = torch.device(a.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1000, hidden_size=a.hidden, intermediate_size=a.intermediate,
                  num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=8,
                  max_position_embeddings=128)
model = LlamaForCausalLM(cfg).to(dev, getattr(torch, a.dtype))
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model, ctl = srlora.wrap(model, srlora.SRLoRAConfig(r=8, lora_alpha=16, r_target=a.r_target,
                                                    target_modules=targets, total_steps=10**6))
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
ctl.attach(opt)
ids = torch.randint(0, 1000, (2, 64), device=dev)
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
times = []
while True:
    sync()
    t = time.perf_counter()
    n = ctl.switch_now()
    sync()
    if not n:
        break
    times.append(time.perf_counter() - t)
print(f"srlora at {srlora.__file__}: {len(ctl.layers)} modules, {len(times)} switches, "
      f"{a.dtype} on {dev} with {a.threads} thread(s): switch_now() median "
      f"{1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f}, "
      f"max {1e3 * max(times):.1f}")
