"""PiSSA init and the switch: exact identities against fp64 SVDs of the ORIGINAL weights."""

import copy

import pytest
import torch
from conftest import TinyNet, rel, tiny_bert, train_steps

import srlora
from srlora_lab.reference import reference_top_svd


def cfg(**kw):
    base = dict(
        r=4,
        lora_alpha=8,
        r_target=16,
        gamma=0.5,
        target_modules=["query", "value"],
        total_steps=10_000,
        svd_method="exact",
    )
    base.update(kw)
    return srlora.SRLoRAConfig(**base)


def originals(model, names=("query", "value")):
    return {n: getattr(model, n).weight.detach().clone().double() for n in names}


@pytest.mark.parametrize("method", ["srlora", "pissa"])
def test_pissa_init_keeps_outputs_and_holds_top_r_part(tiny_net, method):
    W0 = originals(tiny_net)
    x = torch.randn(8, 32)
    y0 = tiny_net(x).detach()
    model, ctl = srlora.wrap(tiny_net, cfg(method=method))
    assert rel(model(x), y0) <= 1e-5  # fp32
    for L in ctl.layers:
        short = L.name.split(".")[-1]
        U, S, Vh = reference_top_svd(W0[short], L.r)
        top = U @ torch.diag(S) @ Vh
        assert rel(L.scaling * L.B().double() @ L.A().double(), top) <= 1e-5
        assert rel(L.W().double(), W0[short] - top) <= 1e-5


def test_pissa_init_matches_peft_pissa(tiny_net):
    from peft import LoraConfig, get_peft_model

    twin = copy.deepcopy(tiny_net)
    model, ctl = srlora.wrap(tiny_net, cfg(method="pissa"))
    pm = get_peft_model(
        twin,
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa"),
    )
    for L in ctl.layers:
        peft_layer = pm.get_submodule(L.name)
        ours = L.B() @ L.A()
        theirs = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        assert rel(ours, theirs) <= 1e-5
        assert rel(L.W(), peft_layer.get_base_layer().weight) <= 1e-5


def test_switch_after_training_keeps_outputs_and_reinits_from_original_svd(tiny_net):
    W0 = originals(tiny_net)
    model, ctl = srlora.wrap(tiny_net, cfg())
    init_B = [L.B().clone() for L in ctl.layers]
    x = torch.randn(16, 32)
    train_steps(model, ctl, x, steps=5)
    for L, b in zip(ctl.layers, init_B):  # the adapters really trained
        assert rel(L.B(), b) > 1e-3
    before = [(L.B().clone(), L.A().clone()) for L in ctl.layers]
    p_before = ctl.pointers
    y1 = model(x).detach()
    assert ctl.switch_now() == 2
    assert rel(model(x), y1) <= 1e-5  # fp32: the switch does not change the function
    k = ctl.config.r_prime
    for L, (B1, A1), p, ev_slots in zip(ctl.layers, before, p_before, ctl.history[-1]["slots"]):
        short = L.name.split(".")[-1]
        U, S, Vh = reference_top_svd(W0[short], 16)
        slots = torch.tensor(ev_slots)
        assert len(slots) == k
        for t, j in enumerate(slots.tolist()):
            d = p + t  # directions p .. p+r'-1 of the ORIGINAL weight, ascending slot order
            expect = torch.outer(U[:, d], Vh[d]) * S[d]
            assert rel(
                L.scaling * torch.outer(L.B()[:, j], L.A()[j]).double(), expect
            ) <= direction_tol(S, d)
        others = [j for j in range(L.r) if j not in slots.tolist()]
        assert torch.equal(L.B()[:, others], B1[:, others])  # bitwise untouched
        assert torch.equal(L.A()[others], A1[others])
    assert ctl.pointers == [p + k for p in p_before]


def direction_tol(S, d):
    """fp32 SVD accuracy of direction d: ~eps32 * sigma_max / gap (Wedin), floored at 1e-5."""
    gaps = [abs(float(S[d] - S[e])) for e in (d - 1, d + 1) if 0 <= e < len(S)]
    return max(1e-5, 20 * 1.2e-7 * float(S[0]) / min(gaps))


def test_trainable_count_and_parameter_identity_survive_switches(tiny_net):
    model, ctl = srlora.wrap(tiny_net, cfg())
    params = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in params)
    ptrs = [p.data_ptr() for p in params]
    train_steps(model, ctl, torch.randn(8, 32), steps=2)
    for _ in range(3):
        ctl.switch_now()
    after = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in after) == count
    assert [p.data_ptr() for p in after] == ptrs and all(a is b for a, b in zip(after, params))


def test_schedule_makes_the_planned_number_of_switches(tiny_net):
    c = cfg(r=4, r_target=16, total_steps=30)  # r' = 2 -> floor(12/2) = 6 switches
    model, ctl = srlora.wrap(tiny_net, c)
    assert c.num_switches == 6
    assert ctl.switch_steps == [4, 8, 12, 16, 20, 24]  # k * floor(30 / 7)
    x = torch.randn(8, 32)
    seen = []
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    for t in range(1, 31):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        if ctl.history and ctl.history[-1]["step"] == t:
            seen.append(t)
    assert seen == [4, 8, 12, 16, 20, 24] and ctl.num_switches == 6
    assert ctl.pointers == [16, 16]


def test_explicit_interval_schedule(tiny_net):
    model, ctl = srlora.wrap(tiny_net, cfg(total_steps=None, switch_interval=3))
    assert ctl.switch_steps == [3 * k for k in range(1, 7)]


def test_exhaustion_stops_small_modules_cleanly():
    torch.manual_seed(1)
    net = TinyNet(d_in=32, d_hidden=10)  # query: 10 x 32 -> only 10 directions
    model, ctl = srlora.wrap(net, cfg(r=4, r_target=20))
    x = torch.randn(8, 32)
    train_steps(model, ctl, x, steps=1)
    counts = [ctl.switch_now() for _ in range(10)]
    # query (K=10) switches 3 times (4->6->8->10); value (K=10 too: 32 x 10) likewise
    assert counts[:3] == [2, 2, 2] and counts[3:] == [0] * 7
    assert ctl.num_switches == 3 and ctl.pointers == [10, 10]
    y = model(x).detach()
    assert ctl.switch_now() == 0 and torch.equal(model(x), y)


def test_exhaustion_mixed_sizes():
    torch.manual_seed(2)
    net = TinyNet(d_in=40, d_hidden=8)  # query 8x40 (K=8), value 40x8 (K=8)
    net.head = torch.nn.Linear(40, 40)
    model, ctl = srlora.wrap(net, cfg(r=4, r_target=16, target_modules=["query", "head"]))
    train_steps(model, ctl, torch.randn(4, 40), steps=1)
    counts = [ctl.switch_now() for _ in range(8)]
    assert counts == [2, 2, 1, 1, 1, 1, 0, 0]
    assert ctl.pointers == [8, 16]


@pytest.mark.parametrize("policy", ["zero", "keep"])
def test_optimizer_state_policy_hits_exactly_the_reinitialized_slices(tiny_net, policy):
    model, ctl = srlora.wrap(tiny_net, cfg(optimizer_state=policy))
    opt = train_steps(model, ctl, torch.randn(8, 32), steps=4)
    before = {
        id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
        for L in ctl.layers
        for p in (L.lora_A, L.lora_B)
    }
    ctl.switch_now()
    for L, slots in zip(ctl.layers, ctl.history[-1]["slots"]):
        for p, dim in ((L.lora_A, 0), (L.lora_B, 1)):
            for key in ("exp_avg", "exp_avg_sq"):
                new, old = opt.state[p][key], before[id(p)][key]
                hit = torch.zeros(p.shape[dim], dtype=torch.bool)
                hit[slots] = True
                sel = [slice(None)] * p.dim()
                sel[dim] = hit
                rest = list(sel)
                rest[dim] = ~hit
                assert torch.count_nonzero(old[tuple(sel)]) > 0  # they were non-zero
                if policy == "zero":
                    assert torch.count_nonzero(new[tuple(sel)]) == 0
                else:
                    assert torch.equal(new[tuple(sel)], old[tuple(sel)])
                assert torch.equal(new[tuple(rest)], old[tuple(rest)])
            assert torch.equal(opt.state[p]["step"], before[id(p)]["step"])


def test_gpt2_conv1d_and_bert_linear_switch_invariance():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    ).eval()
    ids = torch.randint(0, 50, (2, 10))
    y0 = gpt(ids).logits.detach()
    model, ctl = srlora.wrap(gpt, cfg(target_modules=["c_attn", "c_proj"], r_target=12))
    assert all(L.layer.fan_in_fan_out for L in ctl.layers)
    assert rel(model(input_ids=ids).logits, y0) <= 1e-5
    _check_switch_after_training(model, ctl, lambda: model(input_ids=ids).logits)

    bert = tiny_bert()
    ids = torch.randint(0, 100, (2, 12))
    model, ctl = srlora.wrap(bert, cfg(target_modules=["query", "value"]))
    _check_switch_after_training(model, ctl, lambda: model(input_ids=ids).logits)


def test_conv2d_1x1_switch_invariance():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 1)
    )
    x = torch.randn(2, 16, 5, 5)
    y0 = net(x).detach()
    model, ctl = srlora.wrap(net, cfg(target_modules=["0", "2"], r_target=8))
    assert rel(model(x), y0) <= 1e-5
    _check_switch_after_training(model, ctl, lambda: model(x))


def _check_switch_after_training(model, ctl, fwd):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    inits = [L.B().clone() for L in ctl.layers]
    for _ in range(3):
        fwd().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(rel(L.B(), b) > 1e-4 for L, b in zip(ctl.layers, inits))
    y1 = fwd().detach()
    assert ctl.switch_now() == len(ctl.layers)
    assert rel(fwd(), y1) <= 1e-5


def test_switch_factors_are_the_switch_delta_in_one_product():
    from srlora.factors import switch_delta, switch_factors

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    B1, A1, B2, A2 = (
        torch.randn(s, generator=g, dtype=torch.float64)
        for s in ((20, 3), (3, 30), (20, 3), (3, 30))
    )
    Bc, Ac = switch_factors(B1, A1, B2, A2)
    assert Bc.shape == (20, 6) and Ac.shape == (6, 30)
    W = torch.randn(20, 30, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        W.clone().addmm_(Bc, Ac, alpha=0.5),
        W + switch_delta(B1, A1, B2, A2, 0.5),
        rtol=1e-12,
        atol=1e-12,
    )


def test_ledger_state_is_the_written_part_and_loads_back(tiny_net):
    from srlora import CheckpointMismatchError

    twin = copy.deepcopy(tiny_net)
    model, ctl = srlora.wrap(tiny_net, cfg())
    k = ctl.config.r_prime
    sd = ctl.state_dict()
    assert all(m["FB"].shape[1] == 0 and m["FA"].shape[0] == 0 for m in sd["modules"].values())
    train_steps(model, ctl, torch.randn(8, 32), steps=2)
    ctl.switch_now()
    ctl.switch_now()
    sd = ctl.state_dict()
    for L, st in zip(ctl.layers, ctl.modules):
        m, n = L.shape
        assert sd["modules"][L.name]["FB"].shape == (m, 2 * k)
        assert sd["modules"][L.name]["FA"].shape == (2 * k, n)
    _, fresh = srlora.wrap(twin, cfg())
    bad = copy.deepcopy(sd)
    name = ctl.layers[0].name
    bad["modules"][name]["FB"] = bad["modules"][name]["FB"][:, :k]  # one switch short
    U0 = fresh.modules[0].U.clone()
    with pytest.raises(CheckpointMismatchError, match="FB"):
        fresh.load_state_dict(bad)
    assert fresh.pointers == [4, 4] and torch.equal(fresh.modules[0].U, U0)  # nothing written
    fresh.load_state_dict(sd)
    assert fresh.pointers == ctl.pointers
    for a, b in zip(fresh.modules, ctl.modules):
        assert torch.equal(a.FB, b.FB) and torch.equal(a.FA, b.FA)
        assert torch.equal(a.U, b.U)
