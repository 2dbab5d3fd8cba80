"""The switch stacks modules of one shape: every module of a group must still get its own slots,
directions, weight change, ledger entry, optimizer-state and importance resets. Checked module by
module against the fp64 loop reference."""

import os

import pytest
import torch
from conftest import rel, tiny_bert

import srlora
from srlora_lab.reference import reference_switch
from srlora.switch import switch_groups


DEVICES = os.environ.get("SRLORA_TEST_DEVICES", "cpu").split(",")  # as tests/test_devices.py


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reset,split", [("module", False), ("slots", False), ("module", True)])
def test_each_module_of_a_stacked_group_matches_the_reference(reset, split, device):
    """``split``: one 32x32 module gets another lora_alpha, so its state stack (shape, rank,
    store) is switched as two groups and the module-by-module paths of reading directions and
    writing the ledger run instead of the one-slice ones."""
    bert = tiny_bert().to(device)  # 2 layers: query/key/value/dense 32x32 (8: one group), ...
    extra = {"alpha_pattern": {"layer.1.attention.self.key": 4}} if split else {}
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        gamma=0.5,
        total_steps=10_000,
        svd_method="exact",
        importance_reset=reset,
        target_modules=["query", "key", "value", "dense"],
        extra_lora_kwargs=extra,
    )
    model, ctl = srlora.wrap(bert, cfg)
    shapes = [L.shape for L in ctl.layers]
    assert shapes.count((32, 32)) >= 8 and len(set(shapes)) == 3  # stacked groups and others
    groups = switch_groups(ctl.modules, list(range(len(ctl.layers))))
    whole = [ctl.modules[idx[0]].stack.is_whole([ctl.modules[i] for i in idx]) for idx in groups]
    assert len(groups) == 3 + split and all(whole) != split  # a split stack: not whole
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(0, 100, (4, 12), generator=g).to(device)
    for _ in range(3):
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    fresh = ctl.layers[3]  # a module of the big group whose optimizer state is not there yet
    for p in (fresh.lora_A, fresh.lora_B):
        opt.state.pop(p)

    def snap(t):  # a copy on the CPU (``.cpu()`` of a CPU tensor would alias it)
        return t.detach().to("cpu", copy=True)

    before = []
    for i, L in enumerate(ctl.layers):
        st = ctl.modules[i]
        before.append(
            dict(
                W=snap(L.W()),
                B=snap(L.B()),
                A=snap(L.A()),
                p=st.p,
                scores=snap(ctl.pair_scores(i)),
                opt={
                    id(p): {
                        k: snap(v)
                        for k, v in opt.state[p].items()
                        if torch.is_tensor(v) and v.shape == p.shape
                    }
                    for p in (L.lora_A, L.lora_B)
                    if p in opt.state
                },
            )
        )
    y = model(input_ids=ids).logits.detach()
    assert ctl.switch_now() == len(ctl.layers)
    assert rel(model(input_ids=ids).logits, y) <= 1e-5
    k = cfg.r_prime
    for i, (L, b) in enumerate(zip(ctl.layers, before)):
        st = ctl.modules[i]
        W, B, A, chosen, p = reference_switch(
            b["W"],
            b["B"],
            b["A"],
            b["scores"],
            st.U.cpu(),
            st.S.cpu(),
            st.Vh.cpu(),
            b["p"],
            k,
            L.scaling,
        )
        assert ctl.history[-1]["slots"][i] == chosen and st.p == p
        assert rel(L.B().cpu(), B) <= 1e-6 and rel(L.A().cpu(), A) <= 1e-6
        assert (L.W().cpu().double() - W).abs().max() <= 1e-5 * W.abs().max()  # fp32 rounding
        f = st.p - L.r  # the ledger holds this switch's fused pairs, as they were trained
        torch.testing.assert_close(st.FB[:, f - k : f].cpu(), b["B"][:, chosen], rtol=0, atol=0)
        torch.testing.assert_close(st.FA[f - k : f].cpu(), b["A"][chosen], rtol=0, atol=0)
        hit = torch.zeros(L.r, dtype=torch.bool)
        hit[chosen] = True
        for p_, dim in ((L.lora_A, 0), (L.lora_B, 1)):
            sc = ctl.importance.scores(
                ctl.importance_name(ctl.layers.index(L), "B" if dim == 1 else "A")
            ).cpu()
            sel = [slice(None)] * p_.dim()
            sel[dim] = hit if reset == "slots" else slice(None)
            assert torch.count_nonzero(sc[tuple(sel)]) == 0
            if reset == "slots":
                sel[dim] = ~hit
                assert torch.count_nonzero(sc[tuple(sel)]) > 0  # the rest kept its state
            if L is fresh:
                assert p_ not in opt.state
                continue
            for key, old in b["opt"][id(p_)].items():
                new = opt.state[p_][key].cpu()
                sel[dim] = hit
                assert torch.count_nonzero(old[tuple(sel)]) > 0
                assert torch.count_nonzero(new[tuple(sel)]) == 0
                sel[dim] = ~hit
                assert torch.equal(new[tuple(sel)], old[tuple(sel)])
    slots = ctl.history[-1]["slots"]
    assert len({tuple(s) for s in slots}) > 1  # modules of a group chose different slots


def test_stack_slices_equal_the_module_by_module_paths():
    """``next_directions`` / ``write_ledger`` on a whole stack (one slice) and on parts of it or
    members at another pointer (module by module) give the same values; a result is a copy."""
    from srlora.module_state import next_directions, write_ledger

    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        total_steps=10_000,
        svd_method="exact",
        target_modules=["query", "key", "value"],
    )
    _, ctl = srlora.wrap(tiny_bert(), cfg)
    sts = ctl.modules[0].stack.members
    assert len(sts) == 6 and all(st.stack is sts[0].stack for st in ctl.modules)
    k = 2
    whole = next_directions(sts, k, torch.device("cpu"))
    assert sts[0].stack.is_whole(sts)
    for part in (sts[1::2], sts[::-1]):
        assert not sts[0].stack.is_whole(part)
        got = next_directions(part, k, torch.device("cpu"))
        for t, w in zip(got, whole):
            assert torch.equal(t, w[[sts.index(st) for st in part]])
    for g, st in enumerate(sts):  # the values are the cache's directions p .. p+k-1
        assert torch.equal(whole[0][g], st.U[:, st.p : st.p + k])
        assert torch.equal(whole[2][g], st.Vh[st.p : st.p + k])
    whole[0].zero_()
    assert all(st.U[:, st.p : st.p + k].abs().sum() > 0 for st in sts)  # the cache is untouched

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    (m, n), G = sts[0].layer.shape, len(sts)
    B_low, A_low = torch.randn(G, m, k, generator=g), torch.randn(G, k, n, generator=g)
    for st in sts:
        st.p += k
    write_ledger(sts, B_low, A_low)  # one slice per factor
    for gi, st in enumerate(sts):
        assert torch.equal(st.FB, B_low[gi]) and torch.equal(st.FA, A_low[gi])
    sts[2].p += k  # out of step: is_whole is false and only the given members are written
    assert not sts[0].stack.is_whole(sts)
    write_ledger(sts[2:3], 2 * B_low[2:3], 2 * A_low[2:3])
    assert torch.equal(sts[2].FB, torch.cat([B_low[2], 2 * B_low[2]], dim=1))
    assert torch.equal(sts[2].FA, torch.cat([A_low[2], 2 * A_low[2]]))
    assert all(torch.equal(st.FB, B_low[gi]) for gi, st in enumerate(sts) if gi != 2)
