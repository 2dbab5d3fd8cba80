"""Top-k singular directions of a pretrained weight, in fp32, deterministic.

Shape legend: W is ``m x n`` (out x in); k directions are kept: U ``m x k``, S ``k``, Vh ``k x n``,
with ``W ≈ U diag(S) Vh`` and S sorted descending. Only these slices are ever computed and kept.

The randomized SVD works on a batch (``b x m x n``) as well as on one matrix, and
:func:`top_singular_directions_many` stacks modules of one shape so that a model's set-up is a
few batched matrix products instead of hundreds of small calls (what an accelerator needs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from ._errors import SVDInputError

# The small (q x q) problem at the end of the randomized SVD: "svd" (torch.linalg.svd of the
# triangular factor) or "eigh" (fp64 eigendecomposition of its Gram matrix). Per device type;
# the benchmark times both.
SMALL_SOLVER = {"cpu": "svd", "cuda": "eigh"}
ITER_TOL, FINAL_TOL = 1e-2, 1e-5  # |QᵀQ - I| of the bases inside / at the end of the iterations
# Largest stack of fp32 weights one batched call handles (bytes), per device type.
BATCH_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its U column is positive.

    Keeps ``U diag(S) Vh`` unchanged and removes the sign freedom of the SVD, so two
    back-ends (exact, randomized) or two processes agree on the vectors themselves. Batched.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(U.gather(-2, idx))  # (..., 1, k)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.mT


def exact_top_svd(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD (torch.linalg.svd) truncated to the top k directions."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, Vh = _canonical_signs(U[..., :k], Vh[..., :k, :])
    return U.contiguous(), S[..., :k].contiguous(), Vh.contiguous()


def cholesky_qr(
    Y: torch.Tensor, tol: float = 1e-4, passes: int = 2
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``Y = Q R`` by CholeskyQR (Gram matrix, Cholesky, triangular solve: batched products).

    After each pass ``|QᵀQ - I|`` is measured; a second pass (CholeskyQR2) runs only when the
    first is not within ``tol``. Returns ``(Q, R)`` with ``R`` upper triangular, or
    ``(None, None)`` when ``Y`` is too ill-conditioned (a failed Cholesky, a non-finite value,
    or still beyond ``tol`` after ``passes``): the caller then uses Householder QR. One host
    sync per pass.
    """
    Q, R = Y, None
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    for _ in range(passes):
        L, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)  # Q L^-T
        R = L.mT if R is None else L.mT @ R
        err = (Q.mT @ Q - eye).abs().amax()
        failed, err = torch.stack([(info != 0).any().to(err.dtype), err]).tolist()  # one sync
        if failed or not math.isfinite(err):  # Cholesky broke down, or NaN/Inf appeared
            return None, None
        if err <= tol:
            return Q, R
    return None, None


def orthonormal_basis(Y: torch.Tensor, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = Q R`` with orthonormal columns in ``Q`` to ``tol``: CholeskyQR, else Householder."""
    Q, R = cholesky_qr(Y, tol)
    if Q is None:
        Q, R = torch.linalg.qr(Y)
    return Q, R


def _small_svd(
    R: torch.Tensor, solver: str, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the small square ``R`` (``q x q``, batched): ``R = Ur diag(S) Vrh``, S descending.

    "eigh": eigenvectors of ``RᵀR`` in fp64 (``RᵀR = Vr S² Vrᵀ``, ``Ur = R Vr / S``); when one
    of the first ``k`` singular values is below 1e-6 of the largest (a rank-deficient weight),
    ``Ur`` would not be orthonormal there, and the SVD is used instead (one host sync).
    """
    if solver == "eigh":
        lam, Vr = torch.linalg.eigh(R.double().mT @ R.double())
        lam, Vr = lam.flip(-1).clamp_min(0), Vr.flip(-1)
        S = lam.sqrt()
        if not bool((S[..., k - 1] <= 1e-6 * S[..., 0]).any()):
            Ur = (R.double() @ Vr) / S.unsqueeze(-2)
            return Ur.to(R.dtype), S.to(R.dtype), Vr.mT.to(R.dtype)
    return torch.linalg.svd(R)


def randomized_top_svd(
    W: torch.Tensor,
    k: int,
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
    small: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4) with a seeded sketch.

    ``W`` is ``m x n`` or a batch ``b x m x n`` (every matrix gets the same sketch, so a batch
    gives what one call per matrix gives, up to rounding). Sketch width
    ``q = k + oversample``; ``niter`` power iterations, each re-orthonormalized (CholeskyQR,
    Householder QR where that is too ill-conditioned; stable where torch.svd_lowrank is not).
    Then ``QᵀW = R₂ᵀ Q₂ᵀ`` (a QR of its transpose) and the SVD of the small ``q x q`` factor.
    The Gaussian sketch comes from a CPU generator seeded with ``seed``, so every process and
    every device draws the same matrix.
    """
    m, n = W.shape[-2:]
    q = min(k + oversample, m, n)
    small = small or SMALL_SOLVER.get(W.device.type, "svd")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(W.device)
    # the power iterations only need the span: a basis orthonormal to 1e-2 keeps it (one
    # CholeskyQR pass when W is well conditioned); the last two bases are orthonormal to 1e-5
    Q, _ = orthonormal_basis(W @ omega, ITER_TOL if niter else FINAL_TOL)
    for it in range(niter):
        Z, _ = orthonormal_basis(W.mT @ Q, ITER_TOL)
        Q, _ = orthonormal_basis(W @ Z, ITER_TOL if it < niter - 1 else FINAL_TOL)
    Q2, R2 = orthonormal_basis(W.mT @ Q, FINAL_TOL)  # QᵀW = R2ᵀ Q2ᵀ  (q x n)
    Ur, S, Vrh = _small_svd(R2.mT, small, k)  # R2ᵀ = Ur S Vrh
    U, Vh = _canonical_signs((Q @ Ur)[..., :k], (Vrh @ Q2.mT)[..., :k, :])
    return U.contiguous(), S[..., :k].contiguous(), Vh.contiguous()


def _check_finite(W: torch.Tensor, name: str) -> None:
    if not torch.isfinite(W).all():
        bad = int((~torch.isfinite(W)).sum())
        raise SVDInputError(
            f"{name}: {bad} NaN/Inf value(s) in the weight; SRLoRA's SVD needs a "
            "finite weight (check the checkpoint or the model's dtype)"
        )


def _method_for(method: str, k: int, oversample: int, m: int, n: int) -> str:
    if method == "auto":
        return "exact" if k + oversample >= min(m, n) else "randomized"
    return method


def top_singular_directions(
    W: torch.Tensor,
    k: int,
    method: str = "auto",
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``min(k, m, n)`` singular triplets of ``W`` (any float dtype), computed in fp32.

    ``method="auto"`` uses the randomized SVD unless its sketch would cover the whole matrix.
    Raises SVDInputError on NaN/Inf. Falls back from a failed GPU SVD to the CPU.
    """
    W = W.detach().to(torch.float32)
    _check_finite(W, name)
    m, n = W.shape[-2:]
    k = min(k, m, n)
    method = _method_for(method, k, oversample, m, n)
    try:
        if method == "exact":
            return exact_top_svd(W, k)
        return randomized_top_svd(W, k, oversample, niter, seed)
    except RuntimeError:  # e.g. cusolver failing to converge: redo on the CPU
        if W.device.type == "cpu":
            raise
        out = top_singular_directions(W.cpu(), k, method, oversample, niter, seed, name)
        return tuple(t.to(W.device) for t in out)  # type: ignore[return-value]


def top_singular_directions_many(
    weights: Sequence[torch.Tensor],
    ks: Sequence[int],
    method: str = "auto",
    oversample: int = 16,
    niter: int = 4,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    batch_bytes: Optional[int] = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`top_singular_directions` of every weight, matrices of one shape stacked in batches.

    Weights with the same shape, k, device and method go through one batched call, in stacks of
    at most ``batch_bytes`` of fp32 (default ``BATCH_BYTES`` for the device type). Every weight
    is checked for NaN/Inf first (SVDInputError naming it), before any SVD runs. Results come
    back in input order.
    """
    names = list(names) if names is not None else [f"weight {i}" for i in range(len(weights))]
    if not (len(weights) == len(ks) == len(names)):
        raise ValueError(f"{len(weights)} weights, {len(ks)} ks, {len(names)} names")
    for W, name in zip(weights, names):
        _check_finite(W.detach(), name)
    groups: dict = defaultdict(list)
    for i, (W, k) in enumerate(zip(weights, ks)):
        m, n = W.shape
        kk = min(k, m, n)
        groups[(m, n, kk, W.device, _method_for(method, kk, oversample, m, n))].append(i)
    out: list = [None] * len(weights)
    for (m, n, k, device, meth), idx in groups.items():
        budget = batch_bytes if batch_bytes is not None else BATCH_BYTES.get(device.type, 1 << 30)
        per = max(1, budget // (4 * m * n))
        for c in range(0, len(idx), per):
            chunk = idx[c : c + per]
            if meth == "exact" or len(chunk) == 1:
                for i in chunk:
                    out[i] = top_singular_directions(
                        weights[i], k, meth, oversample, niter, seed, names[i]
                    )
                continue
            Wb = torch.stack([weights[i].detach().to(torch.float32) for i in chunk])
            try:
                U, S, Vh = randomized_top_svd(Wb, k, oversample, niter, seed)
            except RuntimeError:  # e.g. cusolver failing: one matrix at a time (with fallback)
                for i in chunk:
                    out[i] = top_singular_directions(
                        weights[i], k, meth, oversample, niter, seed, names[i]
                    )
                continue
            del Wb
            for j, i in enumerate(chunk):
                out[i] = (U[j].clone(), S[j].clone(), Vh[j].clone())
    return out


def subspace_error(U_ref: torch.Tensor, U: torch.Tensor) -> float:
    """sin of the largest principal angle between span(U_ref) and span(U) (0 = same subspace)."""
    Qr, _ = torch.linalg.qr(U_ref.double())
    Q, _ = torch.linalg.qr(U.double())
    s = torch.linalg.svdvals(Qr.T @ Q).clamp(max=1.0)
    return float(torch.sqrt(1 - s.min() ** 2))
