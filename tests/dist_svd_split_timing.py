"""Time srlora.wrap's SVD set-up with 1, 2, ... ranks (the figure in docs/distributed.md).

    torchrun --standalone --nproc_per_node N tests/dist_svd_split_timing.py [--layers 24 --dim 1024]

A stack of random dim x dim Linear layers, all targeted, r=8, r_target=64 (randomized SVD). With
N > 1 each rank decomposes its share and broadcasts it; with N = 1 wrap() decomposes locally.
Rank 0 prints, best of --repeats: wrap()'s wall time and its SVD part (max over ranks), and for
N > 1 the time of the broadcasts and of the input check (SHA-256 of the weights, all-gathered).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

import srlora
from srlora.distributed import shared_svd_fn
from srlora.svd import top_singular_directions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    cfg = srlora.SRLoRAConfig(
        r=8,
        r_target=64,
        target_modules=[str(i) for i in range(a.layers)],
        total_steps=100,
        svd_method="randomized",
    )
    best = None
    for _ in range(a.repeats):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(a.dim, a.dim) for _ in range(a.layers)])
        if world > 1:
            fn = shared_svd_fn(cfg)
        else:

            def fn(layers, ks):
                t = time.perf_counter()
                out = [
                    top_singular_directions(
                        L.W(), k, cfg.svd_method, cfg.svd_oversample, cfg.svd_niter, cfg.svd_seed
                    )
                    for L, k in zip(layers, ks)
                ]
                fn.stats = {"svd_s": time.perf_counter() - t, "broadcast_s": 0.0, "check_s": 0.0}
                return out

        dist.barrier()
        t0 = time.perf_counter()
        srlora.wrap(model, cfg, svd_fn=fn)
        row = torch.tensor(
            [
                time.perf_counter() - t0,
                fn.stats["svd_s"],
                fn.stats["broadcast_s"],
                fn.stats["check_s"],
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(row, op=dist.ReduceOp.MAX)
        best = row if best is None or row[0] < best[0] else best
    if dist.get_rank() == 0:
        w, svd, bc, chk = best.tolist()
        print(
            f"ranks {world}  modules {a.layers} ({a.dim}x{a.dim}, r_target 64)  wrap {w:.2f} s  "
            f"SVD {svd:.2f} s  broadcast {bc:.2f} s  input check {chk:.2f} s",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
