"""Median time of ``controller.switch_now()``, for before/after comparisons.

Uses only the public API (``srlora.wrap``, ``SRLoRAConfig``, ``switch_now``), so the same script
times any commit. Two ways to compare:

- one version per process: check the old commit out in a worktree and put its ``src`` first on
  PYTHONPATH (runs minutes apart: on a shared VM the load can change in between)

      git worktree add /tmp/old 9efa649
      PYTHONPATH=/tmp/old/src python benchmarks/switch_time.py    # before
      PYTHONPATH=src python benchmarks/switch_time.py             # this tree

- both in one process, interleaved (before, after, after, before, ...), with the median of the
  paired ratios: ``--before /tmp/old/src`` loads that tree's package as ``srlora_before``

      PYTHONPATH=src python benchmarks/switch_time.py --model many-small --before /tmp/old/src

Models: ``llama`` (default): Llama with random weights (hidden 512, 4 layers, intermediate 1408,
bf16), r = 8 on all 7 projections (28 modules), r_target 64 (14 switches of r' = 4);
``many-small``: the bench's many-small BERT (24 layers, hidden 128, 144 modules, fp32 unless
--dtype), r_target 128 (30 switches). Two AdamW steps first, so that importance and optimizer
state exist; then every switch is timed.

``--fusion virtual`` builds the tree with ``SRLoRAConfig(fusion="virtual")``; ``--fusion both``
builds it twice, ``weight`` and ``virtual``, interleaved as above (in place of ``--before``).
``--step-time N`` also times N training steps (forward, backward, AdamW step; no switch) of each
run, interleaved, before the first switch and after the last (with ``virtual``, the side path's
rank is then ``2K - r``, its largest), and prints their medians:

    PYTHONPATH=src python benchmarks/switch_time.py --fusion both --step-time 10
"""

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["llama", "many-small"], default="llama")
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--intermediate", type=int, default=1408)
p.add_argument("--dtype", default=None, help="default: bfloat16 (llama), float32 (many-small)")
p.add_argument("--r-target", type=int, default=None, help="default: 64 (llama), 128 (many-small)")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--device", default="cpu")
p.add_argument("--before", default=None, help="a src/ directory of another commit")
p.add_argument(
    "--fusion",
    choices=["weight", "virtual", "both"],
    default="weight",
    help="SRLoRAConfig.fusion of this tree's run; both: a weight and a virtual run",
)
p.add_argument(
    "--step-time",
    type=int,
    default=0,
    metavar="N",
    help="also time N training steps of each run (median)",
)
p.add_argument(
    "--count-ops",
    action="store_true",
    help="also count the ATen ops one switch dispatches (a proxy for kernel launches)",
)
a = p.parse_args()
if a.fusion == "both" and a.before:
    p.error("--fusion both compares two runs of this tree: drop --before")
torch.set_num_threads(a.threads)

import srlora  # noqa: E402  (after the thread setting)

dev = torch.device(a.device)
dtype = getattr(torch, a.dtype or ("bfloat16" if a.model == "llama" else "float32"))
r_target = a.r_target or (64 if a.model == "llama" else 128)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def load_before(src: str):
    """The package under ``src``/srlora, imported as ``srlora_before`` (its imports are
    relative, so a renamed copy is self-contained)."""
    tmp = Path(tempfile.mkdtemp()) / "srlora_before"
    shutil.copytree(Path(src) / "srlora", tmp)
    spec = importlib.util.spec_from_file_location(
        "srlora_before", tmp / "__init__.py", submodule_search_locations=[str(tmp)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["srlora_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def build(pkg, fusion="weight"):
    """(controller, one training step) for package ``pkg`` after two AdamW steps."""
    torch.manual_seed(0)
    if a.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=1000,
            hidden_size=a.hidden,
            intermediate_size=a.intermediate,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=128,
        )
        model = LlamaForCausalLM(cfg).to(dev, dtype)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ids = torch.randint(0, 1000, (2, 64), device=dev)

        def loss(m):
            return m(input_ids=ids, labels=ids).loss
    else:
        from srlora_lab.bench.shapes import SHAPES, build_base_model, loss_of, make_batch

        shape = SHAPES["many-small"]
        model = build_base_model(shape, dev).to(dtype)
        targets = list(shape.targets)
        ids = make_batch(shape, dev)

        def loss(m):
            return loss_of(shape, m, ids)

    extra = {} if fusion == "weight" else {"fusion": fusion}  # "before" may lack the field
    model, ctl = pkg.wrap(
        model,
        pkg.SRLoRAConfig(
            r=8,
            lora_alpha=16,
            r_target=r_target,
            target_modules=targets,
            total_steps=10**6,
            **extra,
        ),
    )
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ctl.attach(opt)

    def step():
        loss(model).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    return ctl, step


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that do work (not views, not allocations); on a GPU each is about
    one kernel launch (or a D2H/H2D copy). Ops called inside another op's kernel (e.g. a CPU
    ``_foreach`` falling back to a loop) are not seen, as on a GPU they are one launch."""

    FREE = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counted_switch(ctl) -> Counter:
    with OpCounter() as c:
        ctl.switch_now()
    return c.ops


def timed_step(step):
    sync()
    t = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t


def timed_switch(ctl):
    sync()
    t = time.perf_counter()
    n = ctl.switch_now()
    sync()
    return (time.perf_counter() - t) if n else None


if a.fusion == "both":
    runs = {"weight": build(srlora), "virtual": build(srlora, "virtual")}
else:
    runs = {"this tree": build(srlora, a.fusion)}
if a.before:
    runs = {"before": build(load_before(a.before)), **runs}
names = list(runs)


def time_steps() -> dict:
    """``a.step_time`` training steps of each run, interleaved: their times by run."""
    out: dict = {k: [] for k in runs}
    for i in range(a.step_time):
        for k in names if i % 2 == 0 else names[::-1]:
            out[k].append(timed_step(runs[k][1]))
    return out


steps = {"at the start": time_steps()}  # p = r (virtual: the side path has rank r)
times: dict = {k: [] for k in runs}
while True:
    order = names if len(times[names[0]]) % 2 == 0 else names[::-1]
    got = {k: timed_switch(runs[k][0]) for k in order}
    if any(t is None for t in got.values()):
        break
    for k, t in got.items():
        times[k].append(t)
steps["after the last switch"] = time_steps()  # p = K (virtual: rank 2K - r)
ctl = runs[names[-1]][0]
print(
    f"{a.model}: {len(ctl.layers)} modules, {len(times[names[-1]])} switches, "
    f"{str(dtype).removeprefix('torch.')} on {dev} with {a.threads} thread(s), "
    f"fusion {a.fusion}"
)
for k, ts in times.items():
    print(
        f"  {k}: switch_now() median {1e3 * statistics.median(ts):.1f} ms, "
        f"min {1e3 * min(ts):.1f}, max {1e3 * max(ts):.1f}"
    )
for when, by_run in steps.items():
    for k, ts in by_run.items():
        if ts:
            print(
                f"  {k}: training step median {1e3 * statistics.median(ts):.1f} ms, "
                f"min {1e3 * min(ts):.1f}, max {1e3 * max(ts):.1f} ({when})"
            )
if len(names) == 2:
    first, second = names
    ratio = statistics.median([b / a_ for a_, b in zip(times[first], times[second])])
    print(f"  {second} / {first}, median of paired ratios: {ratio:.3f}")
if a.count_ops:  # on fresh controllers: the timed ones have used every direction
    mine = (
        [("weight", srlora, "weight"), ("virtual", srlora, "virtual")]
        if a.fusion == "both"
        else [("this tree", srlora, a.fusion)]
    )
    for k, pkg, fusion in [("before", sys.modules.get("srlora_before"), "weight")] + mine:
        if pkg is None:
            continue
        ops = counted_switch(build(pkg, fusion)[0])
        total, n = sum(ops.values()), len(ctl.layers)
        print(
            f"  {k}: one switch dispatches {total} ATen ops ({total / n:.1f} per module); "
            f"most: " + ", ".join(f"{name} {c}" for name, c in ops.most_common(6))
        )
