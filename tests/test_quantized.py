"""SRLoRA / PiSSA / LoRA on bitsandbytes 4-bit and 8-bit bases (fusion="virtual"), for real.

bitsandbytes 0.50.2 runs 4-bit and 8-bit forward and backward on the CPU, so every test below
uses its real ``Linear4bit`` / ``Linear8bitLt`` layers, put in by transformers'
``BitsAndBytesConfig`` (a tiny random Llama) or built directly. Tolerances: fp32 ones (max
difference <= 1e-5 of the logits' scale) where both sides compute the same base in fp32; the
base itself cannot be compared to a dequantized copy more tightly than its kernel computes:
bf16 compute (2e-2) and LLM.int8 (it rounds the activations too: 2e-2).
"""

import copy

import pytest
import torch
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import bitsandbytes as bnb  # requirements-ci.txt pins it: these tests run it for real
import srlora
from srlora import UnsupportedModuleError

KINDS = {  # name: BitsAndBytesConfig kwargs
    "nf4-dq": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    ),
    "int8": dict(load_in_8bit=True),
}
KERNEL_TOL = {"nf4-dq": 1e-5, "fp4": 1e-5, "nf4-bf16": 2e-2, "int8": 2e-2}  # vs dequantized base
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[3, 9, 14, 2, 7, 30, 11, 5], [21, 4, 4, 17, 9, 1, 60, 33]])


def rel_max(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def close(a, b, tol):
    """max |a - b| <= tol * max |b|."""
    err = rel_max(a.detach(), b.detach())
    assert err <= tol, f"relative max difference {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load(path, kind):
    import transformers

    transformers.logging.set_verbosity_error()  # the "Loading weights" bar
    model = LlamaForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(**KINDS[kind]),
        device_map="cpu",
        dtype=torch.float32,
    ).eval()
    # the reference forwards below run before srlora.wrap: without this, bitsandbytes repacks
    # the 4-bit weights in place on a CPU with AVX512-BF16 (and fails for these tiny layers)
    srlora.keep_standard_4bit_layout(model)
    return model


def quantized_bytes(model) -> dict:
    """Every bitsandbytes layer's stored bytes: packed weight, absmax (nested too), SCB."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            w = mod.weight
            out[name] = w.data.clone()
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                out[name + ".absmax"] = qs.absmax.clone()
                if qs.nested:
                    out[name + ".absmax2"] = qs.state2.absmax.clone()
            if isinstance(mod, bnb.nn.Linear8bitLt):  # the first forward moves SCB to .state
                scb = mod.state.SCB if mod.state.SCB is not None else w.SCB
                out[name + ".SCB"] = scb.clone()
    assert out
    return out


def assert_same_bytes(before: dict, after: dict):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


def config(method="srlora", **kw):
    kw = (
        dict(
            r=4,
            lora_alpha=8,
            r_target=12,
            gamma=0.5,
            target_modules=TARGETS,
            fusion="virtual",
            total_steps=8,
            method=method,
        )
        | kw
    )
    if method == "lora":
        kw.pop("fusion")
    return srlora.SRLoRAConfig(**kw)


def train(model, opt, steps):
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_function_kept_at_setup_and_through_switches(llama_dir, kind):
    q = load(llama_dir, kind)
    y_base = logits(q)
    y_deq = logits(copy.deepcopy(q).dequantize())  # the dequantized-base model (transformers)
    before = quantized_bytes(q)
    model, ctl = srlora.wrap(q, config(total_steps=1000))  # the switches: switch_now() below
    y0 = logits(model)
    close(y0, y_base, 1e-5)  # the side path cancels the PiSSA init: the quantized base, exactly
    close(y0, y_deq, KERNEL_TOL[kind])  # = the dequantized base, to what the kernel computes
    print(
        f"| {kind} | {rel_max(y_base, y_deq):.1e} | {rel_max(y0, y_base):.1e} | "
        f"{rel_max(y0, y_deq):.1e} |"
    )  # the table in docs/algorithm.md section 7.1
    for L, st in zip(ctl.layers, ctl.modules):  # the SVD read the dequantized weight
        base = copy.deepcopy(L.layer.get_base_layer())  # PEFT's helper sets state.SCB
        W = dequantize_bnb_weight(base.weight, getattr(base, "state", None))
        close(st.S, torch.linalg.svdvals(W.float())[: st.K], 1e-5)
    opt = optimizer(model)
    ctl.attach(opt)
    train(model, opt, 3)
    assert float((logits(model) - y0).abs().max()) > 1e-3  # training changed the function
    n = len(ctl.layers)
    assert n == 2 * len(TARGETS)
    for _ in range(2):
        y = logits(model)
        assert ctl.switch_now() == n
        close(logits(model), y, 1e-5)
        train(model, opt, 1)
    assert ctl.num_switches == 2 and ctl.pointers == [8] * n
    assert_same_bytes(before, quantized_bytes(q))


def test_pissa_on_4bit_keeps_the_function(llama_dir):
    q = load(llama_dir, "nf4-dq")
    y_base, before = logits(q), quantized_bytes(q)
    model, _ = srlora.wrap(q, config("pissa"))
    close(logits(model), y_base, 1e-5)
    train(model, optimizer(model), 2)
    assert float((logits(model) - y_base).abs().max()) > 1e-3
    assert_same_bytes(before, quantized_bytes(q))


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_export_on_the_quantized_base_and_merged_model(llama_dir, tmp_path, kind):
    from peft import PeftModel

    model, ctl = srlora.wrap(load(llama_dir, kind), config())
    opt = optimizer(model)
    ctl.attach(opt)
    train(model, opt, 8)
    assert ctl.num_switches >= 2
    y = logits(model)
    result = srlora.export_adapter(model, ctl, tmp_path / "adapter")
    assert result.rank == 4 + 8 + 12  # r + fused + subtracted: the side path is in the factors
    fresh = load(llama_dir, kind)
    assert float((logits(fresh) - y).abs().max()) > 1e-3
    close(logits(PeftModel.from_pretrained(fresh, tmp_path / "adapter")), y, 1e-5)
    # save_merged: dequantized + merged, a full-precision model from_pretrained loads as such
    srlora.save_merged(model, ctl, tmp_path / "merged")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    close(logits(merged), y, KERNEL_TOL[kind])
    close(logits(model), y, 0.0)  # the live model is as it was


def test_checkpoint_resume_is_bitwise(llama_dir, tmp_path):
    def run(steps, ckpt_save=None, ckpt_load=None):
        torch.manual_seed(0)
        model, ctl = srlora.wrap(load(llama_dir, "nf4-dq"), config())
        opt = optimizer(model)
        ctl.attach(opt)
        if ckpt_load:
            srlora.load_checkpoint(ckpt_load, model=model, controller=ctl, optimizer=opt)
        train(model, opt, steps)
        if ckpt_save:
            srlora.save_checkpoint(ckpt_save, model=model, controller=ctl, optimizer=opt)
        return model, ctl

    straight, ctl = run(8)
    assert ctl.num_switches >= 2
    run(3, ckpt_save=tmp_path / "ckpt")
    resumed, ctl2 = run(5, ckpt_load=tmp_path / "ckpt")
    assert ctl2.global_step == 8 and ctl2.switch_steps == ctl.switch_steps
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(logits(straight), logits(resumed))


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_weight_fusion_is_refused_before_any_change(llama_dir, kind):
    q = load(llama_dir, kind)
    before, y = quantized_bytes(q), logits(q)
    with pytest.raises(UnsupportedModuleError, match="fusion='virtual'"):
        srlora.wrap(q, config(fusion="weight"))
    assert not hasattr(q, "peft_config")
    assert type(q.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert_same_bytes(before, quantized_bytes(q))
    close(logits(q), y, 0.0)


def test_lora_on_4bit_is_plain_qlora(llama_dir, tmp_path):
    from peft import PeftModel

    q = load(llama_dir, "nf4-dq")
    y_base, before = logits(q), quantized_bytes(q)
    model, ctl = srlora.wrap(q, config("lora"))
    close(logits(model), y_base, 0.0)  # PEFT's LoRA init: B = 0
    train(model, optimizer(model), 3)
    y = logits(model)
    assert float((y - y_base).abs().max()) > 1e-3
    assert_same_bytes(before, quantized_bytes(q))
    srlora.export_adapter(model, ctl, tmp_path / "adapter")
    close(
        logits(PeftModel.from_pretrained(load(llama_dir, "nf4-dq"), tmp_path / "adapter")), y, 1e-5
    )


def bnb_sequential(quant_type="fp4"):
    """Two nn.Linear layers replaced by Linear4bit built by hand (no transformers)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    for i in (0, 2):
        lin = net[i]
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type=quant_type
        )
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=quant_type)
        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        net[i] = q.to("cpu")  # bitsandbytes quantizes here
    return net


def test_hand_built_4bit_layers_merge_into_a_float_model(tmp_path):
    from safetensors.torch import load_model

    net = bnb_sequential()
    x = torch.randn(6, 32)
    model, ctl = srlora.wrap(net, config(target_modules=["0", "2"], r_target=8))
    opt = optimizer(model)
    ctl.attach(opt)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ctl.switch_now()
    with torch.no_grad():
        y = model(x)
    srlora.save_merged(model, ctl, tmp_path / "merged")
    plain = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    load_model(plain, str(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        close(plain(x), y, 1e-5)


def test_unquantized_4bit_layer_is_refused():
    net = nn.Sequential(bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32))  # no .to(): no
    with pytest.raises(UnsupportedModuleError, match="not quantized yet"):  # quant_state yet
        srlora.wrap(net, config(target_modules=["0"]))
    assert not hasattr(net, "peft_config")


def test_wrap_keeps_bitsandbytes_standard_4bit_layout(llama_dir):
    """bitsandbytes 0.49+ repacks a Linear4bit weight in place at an eval-mode no-grad forward
    on a CPU with AVX512-BF16 (block scales rounded to bf16, a layout srlora cannot read).
    wrap turns that off for every 4-bit layer, targeted or not; keep_standard_4bit_layout is
    what it calls."""
    q = LlamaForCausalLM.from_pretrained(
        llama_dir,
        quantization_config=BitsAndBytesConfig(**KINDS["nf4-dq"]),
        device_map="cpu",
        dtype=torch.float32,
    )
    fours = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(fours) == 14  # 7 projections x 2 layers; 3 of them per layer targeted below
    for m in fours:
        m.support_avx512bf16_for_cpu = True  # as on such a CPU, whatever this one has
    model, _ = srlora.wrap(q, config())
    assert all(m.support_avx512bf16_for_cpu is False for m in fours)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert not any(srlora.layers.packed_for_cpu(m) for m in fours)
    assert srlora.keep_standard_4bit_layout(nn.Sequential(nn.Linear(4, 4))) == 0


def test_a_4bit_layer_repacked_for_the_cpu_is_refused_before_any_change(llama_dir):
    """A layer that bitsandbytes has repacked already (flagged in its quant_state: the flag is
    set by hand here, since only an AVX512-BF16 CPU repacks) is refused by wrap with the way
    out, and by the dequantization that export and set-up use."""
    from srlora.layers import dequantize_bnb

    q = load(llama_dir, "nf4-dq")
    before = quantized_bytes(q)
    target = q.model.layers[1].self_attn.v_proj
    target.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(
        UnsupportedModuleError, match="v_proj.*repacked by bitsandbytes.*keep_standard_4bit_layout"
    ):
        srlora.wrap(q, config())
    assert not hasattr(q, "peft_config")
    assert_same_bytes(before, quantized_bytes(q))
    with pytest.raises(UnsupportedModuleError, match="repacked by bitsandbytes"):
        dequantize_bnb(target)


class FakeTorchaoTensor(nn.Parameter):  # stands in for torchao's tensor subclasses (see below)
    pass


FakeTorchaoTensor.__module__ = "torchao.quantization"


class FakeHQQLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)


FakeHQQLinear.__module__ = "hqq.core.quantize"


class FakeQuantoLinear(nn.Linear):
    pass


FakeQuantoLinear.__module__ = "optimum.quanto.nn.qlinear"


@pytest.mark.parametrize("which", ["torchao", "HQQ", "quanto"])
def test_other_quantizers_are_refused_by_name(which):
    # torchao 0.18 runs on this CPU, but with it installed PEFT imports it in every process
    # (6 s on this machine): the refusal reads only the classes' packages, so these stand-ins
    # (torchao: nn.Linear with a float-looking tensor subclass weight) test the same code
    net = nn.Sequential(nn.Linear(4, 4))
    if which == "torchao":
        net[0].weight = FakeTorchaoTensor(net[0].weight.data, requires_grad=False)
    elif which == "HQQ":
        net[0] = FakeHQQLinear()
    else:
        net[0] = FakeQuantoLinear(4, 4)
    with pytest.raises(UnsupportedModuleError, match=f"quantized by {which}.*bitsandbytes"):
        srlora.wrap(net, config(target_modules=["0"]))
    assert not hasattr(net, "peft_config")


def test_example_qlora_4bit_runs(tmp_path):
    import contextlib
    import io
    import runpy
    from pathlib import Path

    main = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "qlora_4bit.py"))["main"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = main(["--steps", "12", "--out", str(tmp_path)])
    text = buf.getvalue()
    assert "trained 12 steps, 4 switches at [2, 4, 6, 8]" in text, text
    setup = float(text.split("function: max rel. diff ")[1].split()[0])
    assert setup <= 1e-5 and res["export_error"] <= 1e-5
    assert float(text.split("change of the logits ")[1].split()[0]) > 0.01
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    close(logits(merged, res["ids"]), res["logits"], 1e-5)


def test_usage_doc_4bit_snippet_is_from_the_example():
    """docs/usage.md's 4-bit block (the README's is checked by tests/test_readme.py)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    section = (root / "docs" / "usage.md").read_text().split("### 4-bit bases")[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = {
        line.strip() for line in (root / "examples" / "qlora_4bit.py").read_text().splitlines()
    }
    missing = [line for line in block.splitlines() if line.strip() not in example]
    assert not missing and 'fusion="virtual"' in block, missing
