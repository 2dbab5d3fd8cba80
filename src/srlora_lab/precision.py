"""How far a half-precision base weight drifts over many switches, against an fp64 reference.

Run ``python -m srlora_lab.precision`` for the table in docs/algorithm.md. The experiment: one
``m x m`` linear layer in bf16 (or fp16), SRLoRA with r=4, r'=2; between switches the factors are
moved by a random "training" update, which an fp64 ledger applies to the reference effective
weight ``W0 + sum of updates``; switches leave the effective weight unchanged in exact
arithmetic. The error is ``max |W_eff - W_ref| / max |W0|`` with ``W_eff = W + s*B@A`` in fp64.
"""

from __future__ import annotations

from typing import Optional

import torch


def measure_fusion_error(
    dtype: torch.dtype = torch.bfloat16,
    switches: int = 50,
    fusion: str = "residual",
    m: int = 128,
    seed: int = 0,
    device: str = "cpu",
    offload_device: Optional[str] = "cpu",
) -> dict:
    from srlora.config import SRLoRAConfig
    from srlora.wrap import wrap

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(m, m, bias=False)).to(dtype).to(device)
    W0 = net[0].weight.detach().double().cpu().clone()
    r, k = 4, 2
    cfg = SRLoRAConfig(
        r=r,
        lora_alpha=8,
        r_target=r + k * switches,
        target_modules=["0"],
        total_steps=10**6,
        svd_method="exact",
        half_fusion=fusion,
        offload_device=offload_device,
    )
    model, ctl = wrap(net, cfg)
    L = ctl.layers[0]
    s = L.scaling
    ref = W0.clone()  # the effective weight in fp64: init and switches leave it unchanged
    gen = torch.Generator().manual_seed(seed + 1)
    ctl.importance.updates += 1  # scores are irrelevant here; silence the no-importance warning
    ctl._warned.add("zerograd")  # ... and the one for an importance that saw only zeros
    errors = []
    for _ in range(switches):
        with torch.no_grad():  # a "training" update of the factors, mirrored in fp64
            dB = 0.05 * torch.randn(L.B().shape, generator=gen) * L.B().abs().mean().cpu()
            dA = 0.05 * torch.randn(L.A().shape, generator=gen) * L.A().abs().mean().cpu()
            B0, A0 = L.B().double().cpu(), L.A().double().cpu()
            L.B().add_(dB.to(L.B().device, L.B().dtype))
            L.A().add_(dA.to(L.A().device, L.A().dtype))
            ref += s * (L.B().double().cpu() @ L.A().double().cpu() - B0 @ A0)
        ctl.switch_now()
        eff = (L.W().double() + s * L.B().double() @ L.A().double()).cpu()
        errors.append(float((eff - ref).abs().max() / W0.abs().max()))
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "fusion": fusion,
        "switches": switches,
        "error_after_1": errors[0],
        "error_after_all": errors[-1],
        "errors": errors,
    }


def main() -> None:
    print("| base dtype | fusion | rel. max error after 1 switch | after 50 switches |")
    print("|---|---|---|---|")
    how = {
        "residual": "int8 residual beside the weight (default)",
        "original": "rebuilt from the original copy",
        "inplace": "in place, fp32 math",
    }
    for dtype in (torch.bfloat16, torch.float16):
        for fusion in ("residual", "original", "inplace"):
            res = measure_fusion_error(dtype, 50, fusion)
            print(
                f"| {res['dtype']} | {how[fusion]} | {res['error_after_1']:.2e} | "
                f"{res['error_after_all']:.2e} |"
            )


if __name__ == "__main__":
    main()
