"""The set-up SVD: randomized against exact, batched against one matrix at a time, fallbacks."""

import pytest
import torch

from srlora.svd import (
    cholesky_qr,
    orthonormal_basis,
    randomized_top_svd,
    subspace_error,
    top_singular_directions,
    top_singular_directions_many,
)


def decaying(m, n, decay=0.85, seed=0, batch=()):
    """Random matrices with singular values decay**i: the top directions are well separated."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S.unsqueeze(-2)) @ V.mT).float()


@pytest.mark.parametrize("small", ["svd", "eigh"])
def test_randomized_matches_exact_on_a_decaying_spectrum(small):
    W = decaying(96, 160, seed=torch.seed() % 2**31)
    U, S, Vh = randomized_top_svd(W, 24, oversample=16, niter=4, small=small)
    Ue, Se, Vhe = torch.linalg.svd(W.double(), full_matrices=False)
    # sigma_i = 0.85**i: (sigma_41/sigma_24)**9 ~ 1e-11, so fp32 rounding is all that is left
    assert subspace_error(Ue[:, :24], U) < 1e-4
    assert torch.allclose(S.double(), Se[:24], rtol=1e-5, atol=0)
    assert torch.allclose(U.double().T @ U.double(), torch.eye(24, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        Vh.double() @ Vh.double().T, torch.eye(24, dtype=torch.float64), atol=1e-5
    )
    rec = (U * S) @ Vh
    best = (Ue[:, :24] * Se[:24]) @ Vhe[:24]
    assert float((rec.double() - best).norm() / best.norm()) < 1e-5


def test_batched_equals_one_matrix_at_a_time():
    Wb = decaying(64, 48, seed=1, batch=(5,)) + 1e-3 * torch.randn(5, 64, 48)
    U, S, Vh = randomized_top_svd(Wb, 8, oversample=8, niter=3)
    for j in range(5):
        u, s, vh = randomized_top_svd(Wb[j], 8, oversample=8, niter=3)
        # same sketch, same arithmetic in another kernel order: fp32 rounding only
        assert torch.allclose(S[j], s, rtol=1e-5, atol=0)
        assert torch.allclose(U[j], u, atol=1e-4)  # canonical signs: the vectors themselves
        assert torch.allclose(Vh[j], vh, atol=1e-4)


def test_many_groups_by_shape_and_keeps_order():
    torch.manual_seed(0)
    shapes = [(40, 30), (30, 40), (40, 30), (12, 10), (40, 30), (30, 40)]
    Ws = [torch.randn(*s) for s in shapes]
    ks = [6, 6, 6, 8, 6, 4]
    out = top_singular_directions_many(
        Ws, ks, "auto", oversample=4, niter=2, batch_bytes=2 * 4 * 40 * 30
    )  # stacks of 2: 2 + 1
    for W, k, (U, S, Vh) in zip(Ws, ks, out):
        ref = top_singular_directions(W, k, "auto", 4, 2)
        kk = min(k, *W.shape)
        assert U.shape == (W.shape[0], kk) and Vh.shape == (kk, W.shape[1])
        assert torch.allclose(S, ref[1], rtol=1e-5)
        assert torch.allclose(U, ref[0], atol=1e-4) and torch.allclose(Vh, ref[2], atol=1e-4)


def test_many_checks_every_weight_before_any_svd():
    Ws = [torch.randn(8, 8), torch.randn(8, 8)]
    Ws[1][2, 3] = float("nan")
    from srlora._errors import SVDInputError

    with pytest.raises(SVDInputError, match="second"):
        top_singular_directions_many(Ws, [2, 2], names=["first", "second"])


def test_cholesky_qr2_refuses_rank_deficient_input_and_householder_takes_over():
    Y = torch.randn(50, 10, dtype=torch.float32)
    Q, R = cholesky_qr(Y, passes=2)
    assert Q is not None
    assert torch.allclose(Q @ R, Y, atol=1e-5)
    assert torch.allclose(Q.T @ Q, torch.eye(10), atol=1e-5)
    Yd = Y.clone()
    Yd[:, 7] = 0.0  # a zero column: the Gram matrix is singular, Cholesky breaks down
    assert cholesky_qr(Yd, passes=2)[0] is None
    Q, R = orthonormal_basis(Yd)  # Householder takes over
    assert torch.allclose(Q.T @ Q, torch.eye(10), atol=1e-5)
    assert torch.allclose(Q @ R, Yd, atol=1e-5)
    Yd[:, 7] = Yd[:, 2]  # duplicated column: whichever path runs, the basis is valid
    Q, R = orthonormal_basis(Yd)
    assert torch.allclose(Q.T @ Q, torch.eye(10), atol=1e-4)
    assert torch.allclose(Q @ R, Yd, atol=1e-4)


@pytest.mark.parametrize("small", ["svd", "eigh"])
def test_rank_deficient_weight_still_gives_orthonormal_directions(small):
    torch.manual_seed(3)
    W = torch.randn(60, 5) @ torch.randn(5, 70)  # rank 5, asked for 12
    U, S, Vh = randomized_top_svd(W, 12, oversample=4, niter=2, small=small)
    assert torch.allclose(U.T @ U, torch.eye(12), atol=1e-4)
    assert float(S[5:].max()) < 1e-4 * float(S[0])
    assert float(((U * S) @ Vh - W).norm() / W.norm()) < 1e-5
