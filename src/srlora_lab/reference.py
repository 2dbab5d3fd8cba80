"""A slow, obviously correct SRLoRA in fp64 with plain loops, to test the fast path against.

Nothing here is used in training. Shapes: W ``m x n``, B ``m x r``, A ``r x n``, s scaling.
"""

from __future__ import annotations

import torch


def reference_top_svd(W: torch.Tensor, k: int):
    """Exact fp64 SVD truncated to k, signs canonical (largest |U| entry of a column positive)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, Vh = U[:, :k].clone(), S[:k].clone(), Vh[:k].clone()
    for j in range(k):
        i = int(U[:, j].abs().argmax())
        if U[i, j] < 0:
            U[:, j] *= -1
            Vh[j] *= -1
    return U, S, Vh


def reference_importance_step(ibar, ubar, w, g, beta1, beta2):
    """Element by element: I = |w g|, ibar' = b1 ibar + (1-b1) I,
    ubar' = b2 ubar + (1-b2)|I-ibar'|."""
    ibar, ubar = ibar.double().clone(), ubar.double().clone()
    wf, gf = w.double().flatten(), g.double().flatten()
    fi, fu = ibar.view(-1), ubar.view(-1)
    for e in range(wf.numel()):
        sens = abs(float(wf[e]) * float(gf[e]))
        fi[e] = beta1 * float(fi[e]) + (1 - beta1) * sens
        fu[e] = beta2 * float(fu[e]) + (1 - beta2) * abs(sens - float(fi[e]))
    return ibar, ubar


def reference_pair_scores(ibar_B, ubar_B, ibar_A, ubar_A):
    """S_j = mean_i (ibar*ubar)(B[i, j]) + mean_l (ibar*ubar)(A[j, l]), by loops."""
    m, r = ibar_B.shape
    n = ibar_A.shape[1]
    out = torch.zeros(r, dtype=torch.float64)
    for j in range(r):
        sb = sum(float(ibar_B[i, j]) * float(ubar_B[i, j]) for i in range(m)) / m
        sa = sum(float(ibar_A[j, l]) * float(ubar_A[j, l]) for l in range(n)) / n
        out[j] = sb + sa
    return out


def reference_switch(W, B, A, scores, U, S, Vh, p, k, s):
    """One recomposition in fp64 by loops over pairs. Returns (W, B, A, chosen slots, new p).

    Chosen: the k lowest scores, ties to the lower index, assigned directions p, p+1, ... in
    ascending slot order. Each fused pair adds ``s * B_j A_j``; each new pair
    ``B_j = U_d sqrt(S_d/s)``, ``A_j = sqrt(S_d/s) Vh_d`` is subtracted the same way.
    """
    W, B, A = W.double().clone(), B.double().clone(), A.double().clone()
    r = B.shape[1]
    ranked = sorted(range(r), key=lambda j: (float(scores[j]), j))
    chosen = sorted(ranked[:k])
    for t, j in enumerate(chosen):
        W += s * torch.outer(B[:, j], A[j])
        d = p + t
        root = (float(S[d]) / s) ** 0.5
        B[:, j] = U[:, d].double() * root
        A[j] = Vh[d].double() * root
        W -= s * torch.outer(B[:, j], A[j])
    return W, B, A, chosen, p + k
