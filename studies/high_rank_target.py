"""Does SRLoRA reach changes of rank above r? A linear teacher-student probe with an exact floor.

One ``d x d`` linear layer, a frozen "pretrained" ``W0`` (singular values ``1/sqrt(i)``), and a
target ``W* = W0 + dW*`` where ``dW*`` has rank ``k`` with ``k`` equal singular values ``a`` along
random directions. Inputs are fresh ``x ~ N(0, I)`` every step and ``y = W* x`` (no noise), so the
population loss of an effective weight ``W`` is exactly ``||W - W*||_F^2 / d`` (read off the model
by feeding it the identity). An adapter that trains one rank-``r`` product ``BA`` on top of a
frozen ``F`` cannot go below its **floor** ``sum_{i > r} sigma_i(W* - F)^2 / d`` (Eckart-Young):
for LoRA ``F = W0`` and the floor is ``(k - r) a^2 / d``; for PiSSA ``F`` is ``W0`` less its top-r
SVD part. SRLoRA starts as PiSSA but fuses trained pairs into ``F`` and can, in principle, go
below both. With ``k <= r`` every method can reach zero.

Protocol (the study's, in miniature): each method's lr is chosen on the selection seeds by the
final population loss (mean over seeds), then the final seeds run at it; paired differences with
95% t-intervals (``srlora_lab.experiments.stats.paired_interval``). One thread; 316 s for
``--ranks 4,16,32`` on this project's CPU, beside two study jobs.

    python studies/high_rank_target.py --ranks 4,16,32       # the table in docs/study.md
    python studies/high_rank_target.py --ranks 32 --seeds 0,1 --steps 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import OrderedDict

import torch

import srlora
from srlora_lab.experiments.stats import paired_interval

METHODS = {  # name -> SRLoRAConfig fields
    "lora": {"method": "lora"},
    "pissa": {"method": "pissa"},
    "srlora": {"method": "srlora"},
    "srlora-protect": {"method": "srlora", "selection": "protect"},
    "srlora-gradient": {"method": "srlora", "insertion": "gradient"},
}


def problem(d: int, k: int, a: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, W*) for one seed: W0 with singular values 1/sqrt(i) along random directions, and
    W* = W0 + a * P Q^T with P, Q random d x k orthonormal (so dW* has k singular values a)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    orth = lambda n: torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))[0]
    U, V = orth(d), orth(d)
    s = 1.0 / torch.arange(1, d + 1, dtype=torch.float64).sqrt()
    W0 = (U * s) @ V.T
    dW = a * orth(k) @ orth(k).T
    return W0.float(), (W0 + dW).float()


def floors(W0: torch.Tensor, Wt: torch.Tensor, r: int) -> dict:
    """The least population loss of a trained rank-r product on LoRA's frozen weight (W0) and on
    PiSSA's (W0 less its top-r SVD part): the squared singular values of W* - F beyond the r-th,
    over d (Eckart-Young), fp64."""
    U, S, Vh = torch.linalg.svd(W0.double())
    frozen = {"lora": W0.double(), "pissa": W0.double() - (U[:, :r] * S[:r]) @ Vh[:r]}
    d = W0.shape[0]
    return {
        m: float((torch.linalg.svdvals(Wt.double() - F)[r:] ** 2).sum() / d)
        for m, F in frozen.items()
    }


def run(
    name: str,
    lr: float,
    seed: int,
    d: int,
    k: int,
    a: float,
    r: int,
    r_target: int,
    steps: int,
    batch: int,
) -> dict:
    W0, Wt = problem(d, k, a, seed)
    model = torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(d, d, bias=False)))
    with torch.no_grad():
        model.lin.weight.copy_(W0)
    torch.manual_seed(seed)  # LoRA's A init
    cfg = srlora.SRLoRAConfig(
        r=r,
        lora_alpha=r,
        r_target=r_target,
        gamma=0.5,
        target_modules=["lin"],
        total_steps=steps,
        **METHODS[name],
    )
    model, ctl = srlora.wrap(model, cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    ctl.attach(opt)
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d)
    for _ in range(steps):
        x = torch.randn(batch, d, generator=g)
        loss = ((model(x) - x @ Wt.T) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        W = model(eye).T  # the effective weight: model(I) = I W^T
        pop = float(((W.double() - Wt.double()) ** 2).sum() / d)
    return {
        "method": name,
        "lr": lr,
        "seed": seed,
        "loss": pop if math.isfinite(pop) else None,
        "switches": ctl.num_switches,
        "floors": floors(W0, Wt, r),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="4,32", help="ranks k of the target change")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--selection-seeds", default="100,101")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--a", type=float, default=0.3, help="each singular value of dW*")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--r-target", type=int, default=32)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", help="write every run and the table here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ints = lambda s: [int(x) for x in s.split(",")]
    methods, lrs = a.methods.split(","), [float(x) for x in a.lrs.split(",")]
    common = dict(d=a.d, a=a.a, r=a.r, r_target=a.r_target, steps=a.steps, batch=a.batch)
    t0, out = time.time(), {"args": vars(a), "runs": [], "rows": []}
    for k in ints(a.ranks):
        final = {}
        for m in methods:
            sel = {
                lr: [run(m, lr, s, k=k, **common)["loss"] for s in ints(a.selection_seeds)]
                for lr in lrs
            }
            ok = {lr: sum(v) / len(v) for lr, v in sel.items() if all(x is not None for x in v)}
            lr = min(ok, key=ok.get)
            recs = [run(m, lr, s, k=k, **common) for s in ints(a.seeds)]
            out["runs"] += [dict(r, k=k) for r in recs]
            final[m] = (lr, [r["loss"] for r in recs])
        fl = {f: sum(r["floors"][f] for r in recs) / len(recs) for f in ("lora", "pissa")}
        print(
            f"\nrank of dW* k = {k}; adapter r = {a.r}, r_target = {a.r_target}; start "
            f"{k * a.a**2 / a.d:.5f}; floor of a rank-{a.r} product: on LoRA's frozen weight "
            f"{fl['lora']:.5f}, on PiSSA's {fl['pissa']:.5f} (mean over the final seeds)"
        )
        print(
            "| method | lr | final population loss, mean over seeds | / LoRA's floor | "
            "/ PiSSA's floor |"
        )
        print("|---|---|---|---|---|")
        for m, (lr, v) in final.items():
            mean = sum(v) / len(v)
            ratio = lambda f: f"{mean / fl[f]:.3f}" if fl[f] > 1e-12 else "-"
            print(f"| {m} | {lr:g} | {mean:.5f} | {ratio('lora')} | {ratio('pissa')} |")
            out["rows"].append({"k": k, "method": m, "lr": lr, "mean": mean, "floors": fl})
        for m in methods:
            for b in ("pissa", "lora"):
                if m != b and b in final and m.startswith("srlora"):
                    ci = paired_interval(final[m][1], final[b][1])
                    print(
                        f"{m} - {b}: {ci['mean_diff']:+.5f} [{ci['ci_low']:+.5f}, "
                        f"{ci['ci_high']:+.5f}] (n = {ci['n']})"
                    )
                    out["rows"].append({"k": k, "a": m, "b": b, **ci})
    print(f"\n{time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
