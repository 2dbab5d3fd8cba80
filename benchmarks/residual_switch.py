"""One bf16 weight's switch with half_fusion="residual", this tree against an older factors.py.

    git show 9efa649:src/srlora/factors.py > /tmp/factors_before.py   # or 11e4298
    python benchmarks/residual_switch.py [--device cpu|cuda] [--threads 1]

The work a switch does per weight: join the int8 residual, add the rank-2r' change, split
again. Both versions run interleaved on the same tensors; the script prints how far each one's
stored value is from an fp64 reference (each version reads back its own encoding) and the
median times.
"""

import argparse
import importlib.util
import statistics
import time

import torch

from srlora import factors as now

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--before", default="/tmp/factors_before.py")
a = p.parse_args()
torch.set_num_threads(a.threads)
dev = torch.device(a.device)
try:  # without the old file (no git checkout, e.g. on a lent GPU machine): this tree only
    spec = importlib.util.spec_from_file_location("before", a.before)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
except (FileNotFoundError, OSError, AttributeError):
    old = None
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

torch.manual_seed(0)
m, n, k = 2048, 5632, 4  # llama-1b's gate/up/down size, r' = 4
W0 = 0.02 * torch.randn(m, n, device=dev)
hi, q = now.split_residual(W0.clone(), torch.bfloat16)
B1, A1, B2, A2 = (0.01 * torch.randn(s, device=dev) for s in ((m, k), (k, n), (m, k), (k, n)))


hi_old, q_old = old.split_residual(W0.clone(), torch.bfloat16) if old else (None, None)


def before():
    if not hasattr(old, "switch_factors"):  # 11e4298
        return old.split_residual(
            old.join_residual(hi_old, q_old) + old.switch_delta(B1, A1, B2, A2, 2.0), torch.bfloat16
        )
    W = old.join_residual(hi_old, q_old).addmm_(*old.switch_factors(B1, A1, B2, A2), alpha=2.0)
    return old.split_residual(W, torch.bfloat16)


def after():
    W = now.join_residual(hi, q).addmm_(*now.switch_factors(B1, A1, B2, A2), alpha=2.0)
    return now.split_residual(W, torch.bfloat16)


ref = W0.double() + 2.0 * (B1.double() @ A1.double() - B2.double() @ A2.double())
runs = [("after", after)] if old is None else [("before", before), ("after", after)]
for name, fn in runs:
    h, r = fn()
    mod = now if name == "after" else old
    err = float((mod.join_residual(h, r).double() - ref).abs().max() / ref.abs().max())
    print(f"{name}: max |stored - fp64| / max |W| = {err:.3e}")
times = {name: [] for name, _ in runs}
for _ in range(12):
    for name, fn in runs:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times[name].append(time.perf_counter() - t)
print(
    f"one {m}x{n} bf16 weight on {dev}, {a.threads} thread(s), median of 12 interleaved: "
    + ", ".join(f"{name} {1e3 * statistics.median(ts):.1f} ms" for name, ts in times.items())
)
