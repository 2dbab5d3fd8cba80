"""studies/high_rank_target.py: its exact floors, and that no rank-r adapter on a frozen weight
goes below its floor while SRLoRA (which fuses into the frozen weight) is not bound by it."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "studies"))
import high_rank_target as hrt  # noqa: E402


@pytest.mark.parametrize("k", [3, 8])
def test_floors_are_the_eckart_young_tails(k):
    d, r, a = 16, 4, 0.5
    W0, Wt = hrt.problem(d, k, a, seed=int(torch.randint(0, 1000, (1,))))
    dW = (Wt - W0).double()
    sv = torch.linalg.svdvals(dW)
    assert torch.allclose(sv[:k], torch.full((k,), a, dtype=torch.float64), atol=1e-5)
    assert float(sv[k:].abs().max()) < 1e-5
    fl = hrt.floors(W0, Wt, r)  # W0 and W* are fp32: their floors hold to fp32 rounding
    assert fl["lora"] == pytest.approx(max(k - r, 0) * a * a / d, rel=1e-6, abs=1e-9)
    # PiSSA's: the best rank-r product on W0 less its top-r part, found independently by
    # truncating the SVD of what that product must represent
    U, S, Vh = torch.linalg.svd(W0.double())
    need = Wt.double() - (W0.double() - (U[:, :r] * S[:r]) @ Vh[:r])
    u, s, vh = torch.linalg.svd(need)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    assert fl["pissa"] == pytest.approx(float(((need - best) ** 2).sum() / d), rel=1e-9)


def test_a_short_run_respects_the_floors_and_reads_the_weight_exactly():
    common = dict(d=16, k=8, a=0.5, r=2, r_target=8, steps=90, batch=32)
    for m in ("lora", "pissa"):
        rec = hrt.run(m, 1e-2, seed=0, **common)
        assert rec["switches"] == 0
        assert rec["loss"] >= rec["floors"][m] - 1e-6, (m, rec)
    sr = hrt.run("srlora", 1e-2, seed=0, **common)
    assert sr["switches"] == 6 and sr["loss"] is not None  # (r_target - r) / (gamma r) = 6
    start = common["k"] * common["a"] ** 2 / common["d"]
    assert sr["loss"] < start  # it trained
