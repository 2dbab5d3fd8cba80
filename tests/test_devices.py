"""The same checks on every device this machine offers for tests.

CI runs them on the CPU. On a machine with a GPU, ``SRLORA_TEST_DEVICES=cpu,cuda`` adds CUDA
(what docs/benchmarks.md records): the SVD on the GPU, the half-precision rebuild with the
state in pinned host memory or on the GPU, the on-device importance path, and state that
saves and loads bitwise.
"""

import os

import pytest
import torch

import srlora
from srlora.importance import ImportanceTracker
from srlora_lab.precision import measure_fusion_error
from srlora.svd import subspace_error, top_singular_directions_many

from conftest import TinyNet, rel

DEVICES = os.environ.get("SRLORA_TEST_DEVICES", "cpu").split(",")
OFFLOAD = ["cpu", None]  # SRLoRA state in host memory (the default) or on the model's device


@pytest.mark.parametrize("device", DEVICES)
def test_batched_svd_on_device_matches_exact(device):
    torch.manual_seed(torch.seed() % 2**31)
    g = [torch.randn(96, 64, dtype=torch.float64) for _ in range(3)]
    # decaying spectra: sigma_i = 0.8**i, well separated top directions
    Ws = []
    for x in g:
        U, _ = torch.linalg.qr(x)
        V, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
        Ws.append(((U * 0.8 ** torch.arange(64.0)) @ V.T).float())
    out = top_singular_directions_many(
        [W.to(device) for W in Ws], [12] * 3, "randomized", oversample=8, niter=4
    )
    for W, (U, S, Vh) in zip(Ws, out):
        assert U.device.type == torch.device(device).type
        Ue, Se, _ = torch.linalg.svd(W.double(), full_matrices=False)
        assert subspace_error(Ue[:, :12], U.cpu()) < 1e-4
        assert torch.allclose(S.cpu().double(), Se[:12], rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", OFFLOAD)
@pytest.mark.parametrize("fusion", ["residual", "original"])
@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0**-8), (torch.float32, 1e-6)])
def test_switches_keep_the_effective_weight_to_one_rounding(device, offload, dtype, ulp, fusion):
    res = measure_fusion_error(
        dtype, switches=12, fusion=fusion, m=48, device=device, offload_device=offload
    )
    # one rounding of the stored weight against the fp64 reference, however many switches
    assert res["error_after_all"] <= 2 * ulp
    assert max(res["errors"]) <= 1.5 * max(res["error_after_1"], ulp / 4)


@pytest.mark.parametrize("device", DEVICES)
def test_offloaded_state_trains_bitwise_like_state_on_the_device(device):
    def run(offload):
        torch.manual_seed(0)
        net = TinyNet().to(device)
        cfg = srlora.SRLoRAConfig(
            r=4,
            lora_alpha=8,
            r_target=16,
            target_modules=["query", "value"],
            total_steps=24,
            offload_device=offload,
        )
        model, ctl = srlora.wrap(net, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctl.attach(opt)
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).to(device)
        before = model(x).detach().clone()
        for _ in range(24):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        assert ctl.num_switches == 6  # (16 - 4) / 2, every 3 steps
        return before, model(x).detach(), ctl.state_dict()

    b0, out_cpu, sd_cpu = run("cpu")
    _, out_dev, sd_dev = run(None)
    assert rel(out_cpu, b0) > 1e-2  # training moved the output
    assert torch.equal(out_cpu, out_dev)  # where the state lives changes no value
    for name, m in sd_cpu["modules"].items():
        for key in ("U", "S", "Vh", "FB", "FA"):
            assert torch.equal(m[key].cpu(), sd_dev["modules"][name][key].cpu()), (name, key)
        assert m["U"].device.type == "cpu"
        assert sd_dev["modules"][name]["U"].device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_importance_on_device_equals_the_cpu_path(device):
    torch.manual_seed(torch.seed() % 2**31)
    shapes = [(8, 40), (40, 8), (8, 12)]
    cpu = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    dev = [torch.nn.Parameter(p.detach().to(device)) for p in cpu]
    names = [f"p{i}" for i in range(len(shapes))]
    t_cpu = ImportanceTracker(dict(zip(names, cpu)), 0.85, 0.85)
    t_dev = ImportanceTracker(dict(zip(names, dev)), 0.85, 0.85)
    for step in range(5):
        for a, b in zip(cpu, dev):
            a.grad = torch.randn(a.shape)
            if step == 2:
                a.grad[0, 0] = float("inf")  # skipped on both paths, counted
            b.grad = a.grad.to(device)
        t_cpu.update()
        t_dev.update()
    assert int(t_cpu.skipped) == int(t_dev.skipped) == 1
    for n in names:
        assert t_cpu.scores(n).abs().sum() > 0
        torch.testing.assert_close(t_dev.scores(n).cpu(), t_cpu.scores(n), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_conv1d_residual_switch_on_transposed_weights(device):
    """GPT-2's Conv1D weights are seen transposed (W is a non-contiguous view): the residual's
    join and split must take the strided path and still keep the stored fp32 value."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from srlora.factors import join_residual

    torch.manual_seed(torch.seed() % 2**31)
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    ).to(device, torch.bfloat16)
    cfg = srlora.SRLoRAConfig(
        r=4,
        lora_alpha=8,
        r_target=12,
        target_modules=["c_attn", "c_fc"],
        total_steps=10_000,
        svd_method="exact",
    )
    model, ctl = srlora.wrap(gpt, cfg)
    assert all(not L.W().is_contiguous() for L in ctl.layers)
    ids = torch.randint(0, 50, (2, 10), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    for _ in range(2):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def effective():  # the stored fp32 weight plus the adapter, in fp64
        return [
            join_residual(L.W(), st.residual).double() + L.scaling * L.B().double() @ L.A().double()
            for L, st in zip(ctl.layers, ctl.modules)
        ]

    before = effective()
    assert ctl.switch_now() == len(ctl.layers)
    for old, new in zip(before, effective()):  # the 8 extra bits: 2**-16 of a value, plus
        assert (new - old).abs().max() <= 2e-5 * old.abs().max()  # fp32 rounding of the change
