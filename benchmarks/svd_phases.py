"""Where srlora's set-up SVD spends its time, per phase, for the llama-1b shapes (CUDA).

    python benchmarks/svd_phases.py [--device cuda] [--k 512]

Stacks random weights of each llama-1b projection shape as ``srlora.wrap`` does (1 GiB
stacks), runs ``randomized_top_svd`` once to warm up and then timed, with the orthonormal
bases and the small q x q solve timed separately (synchronized around each: the phases add up
to a little more than the plain total, which is timed first without that instrumentation).
"""

import argparse
import time
from collections import defaultdict

import torch

import srlora.svd as S

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--k", type=int, default=512)
a = p.parse_args()
dev = torch.device(a.device)
sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
groups = {
    "q,k,v,o 2048x2048": (64, 2048, 2048),
    "gate,up 5632x2048": (32, 5632, 2048),
    "down 2048x5632": (16, 2048, 5632),
}
stats = defaultdict(float)
counts = defaultdict(int)
real_basis, real_small = S.orthonormal_basis, S._small_svd


def timed(name, fn):
    def inner(*args, **kw):
        sync()
        t = time.perf_counter()
        out = fn(*args, **kw)
        sync()
        stats[name] += time.perf_counter() - t
        counts[name] += 1
        return out

    return inner


def cholesky_passes(Y, tol=1e-4):  # how often one pass sufficed, two, or Householder ran
    Q, R = S.cholesky_qr(Y, tol, passes=1)
    if Q is not None:
        counts["basis: 1 Cholesky pass"] += 1
        return Q, R
    Q, R = S.cholesky_qr(Y, tol, passes=2)
    counts["basis: 2 passes" if Q is not None else "basis: Householder"] += 1
    return (Q, R) if Q is not None else torch.linalg.qr(Y)


print(
    f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
    f"torch {torch.__version__}, k {a.k}, oversample 16, niter 4, stacks of "
    f"{S.BATCH_BYTES.get(dev.type) >> 20} MiB"
)
print(
    "| shape (modules) | stack | total | bases | small solve eigh | small solve svd | "
    "bases: 1 pass / 2 / Householder |"
)
print("|---|---|---|---|---|---|---|")
grand = 0.0
for label, (b, m, n) in groups.items():
    torch.manual_seed(0)
    W = torch.randn(b, m, n, device=dev, dtype=torch.bfloat16) * 0.02
    per = max(1, S.BATCH_BYTES.get(dev.type, 1 << 30) // (4 * m * n))
    chunks = [W[i : i + per] for i in range(0, b, per)]
    solver = S.SMALL_SOLVER.get(dev.type, "svd")
    S.randomized_top_svd(chunks[0].float(), a.k)  # warm-up
    sync()
    t = time.perf_counter()
    for c in chunks:
        S.randomized_top_svd(c.float(), a.k)
    sync()
    total = time.perf_counter() - t
    stats.clear(), counts.clear()

    def both_small(R, which, k):  # time each solver on the same small factor
        for name in ("eigh", "svd"):
            timed(name, real_small)(R, name, k)
        return real_small(R, which, k)

    S.orthonormal_basis, S._small_svd = timed("bases", cholesky_passes), both_small
    for c in chunks:
        S.randomized_top_svd(c.float(), a.k)
    S.orthonormal_basis, S._small_svd = real_basis, real_small
    grand += total
    print(
        f"| {label} ({b}) | {len(chunks)} x {per} | {total:.3f} s | {stats['bases']:.3f} s "
        f"({counts['bases']} calls) | {stats['eigh']:.3f} s | {stats['svd']:.3f} s | "
        f"{counts['basis: 1 Cholesky pass']} / {counts['basis: 2 passes']} / "
        f"{counts['basis: Householder']} |"
    )
print(
    f"all 112 modules, default small solver ({S.SMALL_SOLVER.get(dev.type)}): {grand:.3f} s "
    "(randomized SVD only)"
)
