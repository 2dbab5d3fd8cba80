"""Mechanism diagnostics (srlora_lab.experiments.diagnostics) on hand-made histories, random factors
and a tiny model trained with a known switch schedule."""

import math

import pytest
import torch

import srlora
from srlora_lab.experiments import diagnostics as dg

from conftest import TinyNet


# ----------------------------------------------------------------------------- pure pieces
def _hand_history():
    """Module 0 (r=4) switches three times (steps 10, 20, 30); module 1 only at the first."""
    return [
        {"step": 10, "modules": [0, 1], "slots": [[0, 1], [2, 3]], "directions": [[4, 5], [4, 5]]},
        {"step": 20, "modules": [0], "slots": [[0, 2]], "directions": [[6, 7]]},
        {"step": 30, "modules": [0], "slots": [[1, 2]], "directions": [[8, 9]]},
    ]


def test_schedule_of_a_hand_made_history():
    got = dg.fused_pair_schedule(_hand_history(), [4, 4])
    m0 = [(p["switch"], p["slot"], p["direction"], p["age"], p["new"]) for p in got[0]]
    assert m0 == [
        (1, 0, 0, 10, False),
        (1, 1, 1, 10, False),  # set-up slots, age = 10 - 0
        (2, 0, 4, 10, True),
        (2, 2, 2, 20, False),  # slot 0 got direction 4 at 10
        (3, 1, 5, 20, False),
        (3, 2, 7, 10, True),
    ]  # slot 1 got 5 at 10, slot 2 7 at 20
    assert [(p["slot"], p["direction"], p["age"]) for p in got[1]] == [(2, 2, 10), (3, 3, 10)]


def test_survivors_of_a_hand_made_history():
    s = dg.survivors(_hand_history())
    # inserted: 2 + 2 (switch 1) + 2 + 2; at risk: module 0's switches 1 and 2 (module 1 never
    # switched again); fused at the next switch: slot 0 (1 -> 2) and slot 2 (2 -> 3)
    assert s == {
        "inserted": 8,
        "at_risk": 4,
        "fused_next": 2,
        "survived": 2,
        "fused_after_first": 4,
        "survived_frac": 0.5,
    }


def test_spectrum_from_factors_equals_dense_svd_fp64():
    """fp64: the QR route equals a dense SVD of the product to 1e-10 relative (to sigma_max)."""
    g = torch.Generator().manual_seed(1)
    for m, n, k in ((40, 30, 6), (12, 50, 20), (64, 64, 64)):  # k > m: more factors than rows
        B = torch.randn(m, k, generator=g, dtype=torch.float64)
        A = torch.randn(k, n, generator=g, dtype=torch.float64)
        B[:, 1] = B[:, 0]  # a repeated column: rank deficient
        got = dg.spectrum_from_factors(B, A, 0.7)
        want = torch.linalg.svdvals(0.7 * B @ A)
        q = min(len(got), len(want))
        assert (got[:q] - want[:q]).abs().max() <= 1e-10 * want[0]
        assert (want[q:].abs() <= 1e-10 * want[0]).all()  # the rest are zeros
    assert len(dg.spectrum_from_factors(torch.zeros(5, 0), torch.zeros(0, 4))) == 0


def test_effective_rank_known_values():
    er = dg.effective_rank(torch.ones(4))
    assert er["erank"] == pytest.approx(4.0, rel=1e-12) and er["energy90"] == 4
    assert dg.effective_rank(torch.tensor([2.0, 0.0, 0.0])) == {
        "erank": 1.0,
        "energy90": 1,
        "energy99": 1,
    }
    er = dg.effective_rank(torch.tensor([4.0, 1.0]))  # energy 16/17 = 0.94
    h = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert er["erank"] == pytest.approx(math.exp(h), rel=1e-12)
    assert (er["energy90"], er["energy99"]) == (1, 2)
    assert dg.effective_rank(torch.zeros(3)) == {"erank": 0.0, "energy90": 0, "energy99": 0}


def test_pair_moved_equals_dense_formula():
    g = torch.Generator().manual_seed(2)
    b0, a0 = (
        torch.randn(30, generator=g, dtype=torch.float64),
        torch.randn(20, generator=g, dtype=torch.float64),
    )
    assert dg.pair_moved(b0, a0, b0, a0) == 0.0
    for eps in (1e-6, 1e-2, 1.0):
        b = b0 + eps * torch.randn(30, generator=g, dtype=torch.float64)
        a = a0 + eps * torch.randn(20, generator=g, dtype=torch.float64)
        want = float(
            torch.linalg.norm(torch.outer(b, a) - torch.outer(b0, a0))
            / torch.linalg.norm(torch.outer(b0, a0))
        )
        assert dg.pair_moved(b, a, b0, a0) == pytest.approx(want, rel=1e-9)


# ----------------------------------------------------------------------------- a tiny model
INTERVAL, SWITCHES = 5, 4


def _trained(method, lr, steps=INTERVAL * (SWITCHES + 1), seed=0):
    """TinyNet with r=4 on query/value, r_target 12, r'=2: switches at 5, 10, 15, 20."""
    torch.manual_seed(seed)
    net = TinyNet()
    W0 = {n: net.get_submodule(n).weight.detach().clone() for n in ("query", "value")}
    cfg = srlora.SRLoRAConfig(
        method=method,
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        target_modules=["query", "value"],
        switch_interval=INTERVAL,
        total_steps=steps,
    )
    model, ctl = srlora.wrap(net, cfg)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    ctl.attach(opt)
    g = torch.Generator().manual_seed(seed + 10)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, ctl, W0


def _evidence_count(switch_log):
    """evidence.md's hand count: walk the switches in order, remember for each (module, slot)
    the step at which it was last written, count fusions whose slot was written at the previous
    switch (and the fusions after the first switch)."""
    written, churn, after_first, prev = {}, 0, 0, None
    for e in switch_log:
        for m, slots in zip(e["modules"], e["slots"]):
            for s in slots:
                if prev is not None:
                    after_first += 1
                    churn += written.get((m, s)) == prev
                written[(m, s)] = e["step"]
        prev = e["step"]
    return churn, after_first


def test_known_schedule_ages_and_evidence_count():
    _, ctl, _ = _trained("srlora", 1e-2)
    assert [e["step"] for e in ctl.history] == [5, 10, 15, 20]
    d = dg.collect(ctl)
    pairs = d["pairs"]
    assert len(pairs) == 2 * SWITCHES * 2  # 2 modules x 4 switches x r'=2
    assert [len(st.FA) for st in ctl.modules] == [SWITCHES * 2] * 2
    new = [p for p in pairs if p["new"]]
    assert new, "no slot was fused one interval after its insertion: the check would be vacuous"
    assert all(p["age"] == INTERVAL for p in new)  # inserted at switch k, fused at k+1
    assert all(p["age"] % INTERVAL == 0 and p["age"] >= INTERVAL for p in pairs)
    assert all(p["age"] > INTERVAL for p in pairs if not p["new"] and p["sw"] > 1)
    assert all(
        p["age"] == INTERVAL and not p["new"] and p["dir"] < 4 for p in pairs if p["sw"] == 1
    )
    names = [L.name for L in ctl.layers]
    log = [
        {"step": e["step"], "modules": [names[i] for i in e["modules"]], "slots": e["slots"]}
        for e in ctl.history
    ]
    churn, after_first = _evidence_count(log)
    s = d["summary"]
    assert (s["fused_next"], s["fused_after_first"]) == (churn, after_first) == (len(new), 12)
    assert s["survived"] == s["at_risk"] - churn and s["at_risk"] == 12
    assert all(p["moved"] > 1e-3 for p in pairs)  # trained at lr 1e-2: every pair moved


def test_untouched_pairs_have_moved_zero():
    """lr 0: every fused pair is exactly its direction's initial product, so the bookkeeping of
    which direction each slot held is checked too (a wrong direction gives moved ~ 1)."""
    _, ctl, _ = _trained("srlora", 0.0)
    pairs = dg.collect(ctl)["pairs"]
    assert len(pairs) == 16 and {p["dir"] for p in pairs} >= {0, 4}
    assert max(p["moved"] for p in pairs) < 1e-6  # fp32 factors against fp64 recomputation


@pytest.mark.parametrize("method", ["lora", "pissa", "srlora"])
def test_spectrum_of_the_total_change_matches_the_materialised_change(method):
    """The factors' spectrum equals a dense SVD of W_eff - W0 materialised from the trained
    model. The weights are fp32, so the tolerance is 1e-5 relative to ||W0||_2 (the change is
    formed by subtracting two fp32 weights)."""
    model, ctl, W0 = _trained(method, 1e-2)
    d = dg.collect(ctl)
    for i, L in enumerate(ctl.layers):
        W_eff = L.W().double() + L.scaling * L.B().double() @ L.A().double()
        key = "query" if "query" in L.name else "value"
        dense = torch.linalg.svdvals(W_eff - W0[key].double())
        got = torch.tensor(d["spectra"][i]["sv"], dtype=torch.float64)
        tol = 1e-5 * float(torch.linalg.matrix_norm(W0[key].double(), 2))
        assert dense[0] > 100 * tol  # the change is not lost in the tolerance
        q = len(got)
        # the record keeps 4 significant digits
        assert torch.allclose(got, dense[:q], rtol=1e-3, atol=tol)
        sv = dg.spectrum_from_factors(*ctl.delta_factors(i), L.scaling)
        assert (sv - dense[: len(sv)]).abs().max() <= tol
        er = dg.effective_rank(dense)
        assert d["spectra"][i]["erank"] == pytest.approx(er["erank"], rel=1e-3, abs=1e-3)
    if method == "lora":  # rank r: at most 4 non-zero singular values
        assert all(s["energy99"] <= 4 for s in d["spectra"])
    assert (d["pairs"] == []) == (method != "srlora")
