"""Thin accessors over PEFT's LoRA layers.

Every supported layer is seen as ``W (m x n)``, ``B``, ``A``.

Supported: ``nn.Linear``, GPT-2's ``Conv1D`` (PEFT's fan_in_fan_out; its weight is ``n x m``) and
``nn.Conv2d`` with a 1x1 kernel and groups=1 (a linear map over channels). The 2-D tensors handed
out are views of the live parameters, so writing into them edits the parameters in place and the
optimizer, DDP and compiled graphs keep their references.

bitsandbytes ``Linear4bit`` (nf4, fp4) and ``Linear8bitLt`` bases are served with
``fusion="virtual"`` only: ``W()`` is then a dequantized copy (the weight the layer computes
with), read for the SVD; the quantized parameter itself is never written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import nn

from ._errors import UnsupportedModuleError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


# packages of quantizers whose layers SRLoRA refuses by name (PEFT's LoRA takes them)
OTHER_QUANTIZERS = {
    "torchao": "torchao",
    "hqq": "HQQ",
    "auto_gptq": "GPTQ",
    "gptqmodel": "GPTQ",
    "awq": "AWQ",
    "optimum.quanto": "quanto",
    "quanto": "quanto",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "compressed_tensors": "compressed-tensors",
}
SUPPORTED_QUANTIZED = (
    "bitsandbytes Linear4bit (nf4, fp4, with or without double quantization) "
    "and Linear8bitLt, with SRLoRAConfig(fusion='virtual')"
)


def bnb_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"`` / ``"8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, else None
    (a model holding one has imported bitsandbytes already; it is not imported here)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def other_quantizer(module: nn.Module) -> Optional[str]:
    """The name of a quantizer other than bitsandbytes that made ``module`` or its weight
    (torchao, HQQ, GPTQ, AWQ, ...), read from the classes' packages; None if none."""
    for cls in (type(module), type(getattr(module, "weight", None))):
        for package, name in OTHER_QUANTIZERS.items():
            if cls.__module__ == package or cls.__module__.startswith(package + "."):
                return name
    return None


def packed_for_cpu(module: nn.Module) -> bool:
    """True when bitsandbytes has repacked this ``Linear4bit``'s weight into its CPU inference
    layout (``quant_state.packing_format_for_cpu``): bitsandbytes (0.50.2, pinned) does so in
    place at the first forward in eval mode without gradients on a CPU with AVX512-BF16,
    rounding the block scales to bf16. srlora reads and dequantizes the standard layout only."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU repack (:func:`packed_for_cpu`) for every
    ``Linear4bit`` of ``model``; returns how many layers it set. ``srlora.wrap`` calls it; call it
    yourself right after loading a 4-bit model on a CPU if you run the model in eval mode before
    wrapping it. Layers keep computing the same function (bitsandbytes' generic CPU path)."""
    n = 0
    for m in model.modules():
        if bnb_kind(m) == "4bit" and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


@torch.no_grad()
def dequantize_bnb(module: nn.Module) -> torch.Tensor:
    """The ``m x n`` weight a bitsandbytes layer computes with, as a new tensor: 4-bit in the
    dtype it was quantized from (``quant_state.dtype``), 8-bit in float32. Reads only (unlike
    ``peft.utils.integrations.dequantize_bnb_weight``, it never sets ``state.SCB``)."""
    import bitsandbytes as bnb

    w = module.weight
    if bnb_kind(module) == "4bit":
        if packed_for_cpu(module):
            raise UnsupportedModuleError(PACKED_MSG.format(what="a Linear4bit layer"))
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    scb = module.state.SCB if module.state.SCB is not None else w.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()


PACKED_MSG = (
    "{what}: its weight was repacked by bitsandbytes into its CPU inference layout (a "
    "forward in eval mode without gradients on a CPU with AVX512-BF16); srlora needs "
    "the standard 4-bit layout: load the model again and call "
    "srlora.keep_standard_4bit_layout(model) before running it, or wrap it first"
)


def _check_bnb(name: str, module: nn.Module, kind: str, fusion: str) -> None:
    if fusion != "virtual":
        raise UnsupportedModuleError(
            f"target module {name!r} is a bitsandbytes {kind} layer ({type(module).__name__}); "
            "SRLoRA and PiSSA cannot write the residual and the fused pairs into a quantized "
            "weight. Use SRLoRAConfig(fusion='virtual') (the base stays quantized and "
            "untouched; they go into a frozen low-rank side path), or method='lora' for QLoRA"
        )
    w = module.weight
    if kind == "4bit" and packed_for_cpu(module):
        raise UnsupportedModuleError(PACKED_MSG.format(what=f"target module {name!r}"))
    if kind == "4bit" and getattr(w, "quant_state", None) is None:
        raise UnsupportedModuleError(
            f"target module {name!r}: its Linear4bit weight is not quantized yet (bitsandbytes "
            "quantizes on the first move to a device: call model.to(device) before srlora.wrap)"
        )
    if kind == "8bit" and w.dtype != torch.int8:
        raise UnsupportedModuleError(
            f"target module {name!r}: its Linear8bitLt weight is {w.dtype}, not int8 "
            "(has_fp16_weights=True, or not moved to a device yet); SRLoRA supports the "
            "quantized inference layout (has_fp16_weights=False) after model.to(device)"
        )


def check_supported(name: str, module: nn.Module, fusion: str = "weight") -> None:
    """Raise UnsupportedModuleError unless ``module`` is a float layer SRLoRA can decompose, or
    (with ``fusion="virtual"``) a bitsandbytes 4-bit or 8-bit linear layer."""
    kind = bnb_kind(module)
    if kind is not None:
        return _check_bnb(name, module, kind, fusion)
    other = other_quantizer(module)
    if other is not None:
        raise UnsupportedModuleError(
            f"target module {name!r} is quantized by {other} ({type(module).__name__}, weight "
            f"{type(getattr(module, 'weight', None)).__name__}); SRLoRA and PiSSA support "
            f"{SUPPORTED_QUANTIZED}. Use method='lora' (PEFT's LoRA takes {other} layers), or "
            "load the model unquantized or in bitsandbytes 4-bit / 8-bit"
        )
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            raise UnsupportedModuleError(
                f"target module {name!r} is a Conv2d with kernel {tuple(module.kernel_size)} and "
                f"groups={module.groups}; SRLoRA supports only 1x1, groups=1 convolutions (use "
                "method='lora' for the others, or leave this module out of target_modules)"
            )
    elif not (isinstance(module, nn.Linear) or _is_conv1d(module)):
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(module).__name__}; SRLoRA supports nn.Linear, "
            "transformers' Conv1D and 1x1 nn.Conv2d (leave it out of target_modules, or use "
            "method='lora')"
        )
    w = getattr(module, "weight", None)
    cls = type(w).__name__ if w is not None else "None"
    if w is None or cls in ("Params4bit", "Int8Params") or w.dtype not in FLOAT_DTYPES:
        raise UnsupportedModuleError(
            f"target module {name!r} has a {cls} weight of dtype {getattr(w, 'dtype', None)}; "
            "SRLoRA fuses updates into the frozen weight and needs it in float32, bfloat16 or "
            "float16. Load the model unquantized (e.g. dtype=torch.bfloat16) and quantize the "
            "merged result after training, or use method='lora' for QLoRA (bitsandbytes "
            "Linear4bit / Linear8bitLt layers: SRLoRAConfig(fusion='virtual'))"
        )


@dataclass
class AdaptedLayer:
    """One PEFT LoRA layer seen through the SRLoRA shapes."""

    name: str
    layer: nn.Module  # a peft.tuners.lora.LoraLayer
    adapter: str = "default"

    # the modules are looked up once (PEFT's wrappers do not change after injection); their
    # parameters are read live at every call, so a replaced parameter is always the one seen
    @cached_property
    def _modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return (
            self.layer.get_base_layer(),
            self.layer.lora_A[self.adapter],
            self.layer.lora_B[self.adapter],
        )

    @property
    def base_weight(self) -> nn.Parameter:
        return self._modules[0].weight

    @property
    def lora_A(self) -> nn.Parameter:
        return self._modules[1].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self._modules[2].weight

    @cached_property
    def quantized(self) -> Optional[str]:
        """``"4bit"`` / ``"8bit"`` for a bitsandbytes base layer, else None."""
        return bnb_kind(self._modules[0])

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def r(self) -> int:
        return int(self.layer.r[self.adapter])

    def W(self) -> torch.Tensor:
        """The frozen weight as an ``m x n`` view (out x in) of the live parameter; for a
        bitsandbytes base a dequantized copy (writing into it changes nothing)."""
        if self.quantized:
            return dequantize_bnb(self._modules[0])
        w = self.base_weight.data
        if getattr(self.layer, "fan_in_fan_out", False):
            return w.T
        return w.reshape(w.shape[0], -1) if w.dim() == 4 else w

    def A(self) -> torch.Tensor:
        """``r x n`` view of lora_A's weight."""
        a = self.lora_A.data
        return a.reshape(a.shape[0], -1)

    def B(self) -> torch.Tensor:
        """``m x r`` view of lora_B's weight."""
        b = self.lora_B.data
        return b.reshape(b.shape[0], -1)

    @property
    def shape(self) -> tuple[int, int]:
        if self.quantized:  # without dequantizing
            base = self._modules[0]
            return (base.out_features, base.in_features)
        return tuple(self.W().shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``W()`` (for a 4-bit base the dtype it was quantized from)."""
        if self.quantized == "4bit":
            return self.base_weight.quant_state.dtype
        return torch.float32 if self.quantized else self.base_weight.dtype
