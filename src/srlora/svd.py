"""Top-k singular directions of a pretrained weight, in fp32, deterministic.

Shape legend: W is ``m x n`` (out x in); k directions are kept: U ``m x k``, S ``k``, Vh ``k x n``,
with ``W ≈ U diag(S) Vh`` and S sorted descending. Only these slices are ever computed and kept.
"""
from __future__ import annotations

import torch

from ._errors import SVDInputError


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its U column is positive.

    Keeps ``U diag(S) Vh`` unchanged and removes the sign freedom of the SVD, so two
    back-ends (exact, randomized) or two processes agree on the vectors themselves.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx[None, :]).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs[None, :], Vh * signs[:, None]


def exact_top_svd(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD (torch.linalg.svd) truncated to the top k directions."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, Vh = _canonical_signs(U[:, :k], Vh[:k])
    return U.contiguous(), S[:k].contiguous(), Vh.contiguous()


def randomized_top_svd(W: torch.Tensor, k: int, oversample: int = 16, niter: int = 4,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4) with a seeded sketch.

    Sketch width ``q = k + oversample``; ``niter`` power iterations, each re-orthonormalized by QR
    (stable where torch.svd_lowrank is not). The Gaussian sketch comes from a CPU generator seeded
    with ``seed``, so every process and every device draws the same matrix.
    """
    m, n = W.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(W.device)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    U, Vh = _canonical_signs((Q @ Ub)[:, :k], Vh[:k])
    return U.contiguous(), S[:k].contiguous(), Vh.contiguous()


def top_singular_directions(W: torch.Tensor, k: int, method: str = "auto", oversample: int = 16,
                            niter: int = 4, seed: int = 0, name: str = "weight"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``min(k, m, n)`` singular triplets of ``W`` (any float dtype), computed in fp32.

    ``method="auto"`` uses the randomized SVD unless its sketch would cover the whole matrix.
    Raises SVDInputError on NaN/Inf. Falls back from a failed GPU SVD to the CPU.
    """
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise SVDInputError(f"{name}: {bad} NaN/Inf value(s) in the weight; SRLoRA's SVD needs a "
                            "finite weight (check the checkpoint or the model's dtype)")
    m, n = W.shape
    k = min(k, m, n)
    if method == "auto":
        method = "exact" if k + oversample >= min(m, n) else "randomized"
    try:
        if method == "exact":
            return exact_top_svd(W, k)
        return randomized_top_svd(W, k, oversample, niter, seed)
    except RuntimeError:  # e.g. cusolver failing to converge: redo on the CPU
        if W.device.type == "cpu":
            raise
        out = top_singular_directions(W.cpu(), k, method, oversample, niter, seed, name)
        return tuple(t.to(W.device) for t in out)  # type: ignore[return-value]


def subspace_error(U_ref: torch.Tensor, U: torch.Tensor) -> float:
    """sin of the largest principal angle between span(U_ref) and span(U) (0 = same subspace)."""
    Qr, _ = torch.linalg.qr(U_ref.double())
    Q, _ = torch.linalg.qr(U.double())
    s = torch.linalg.svdvals(Qr.T @ Q).clamp(max=1.0)
    return float(torch.sqrt(1 - s.min() ** 2))
