"""Thin accessors over PEFT's LoRA layers: every supported layer seen as ``W (m x n)``, ``B``, ``A``.

Supported: ``nn.Linear``, GPT-2's ``Conv1D`` (PEFT's fan_in_fan_out; its weight is ``n x m``) and
``nn.Conv2d`` with a 1x1 kernel and groups=1 (a linear map over channels). The 2-D tensors handed
out are views of the live parameters, so writing into them edits the parameters in place and the
optimizer, DDP and compiled graphs keep their references.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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


def check_supported(name: str, module: nn.Module) -> None:
    """Raise UnsupportedModuleError unless ``module`` is a float layer SRLoRA can decompose."""
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1) or module.groups != 1:
            raise UnsupportedModuleError(
                f"target module {name!r} is a Conv2d with kernel {tuple(module.kernel_size)} and "
                f"groups={module.groups}; SRLoRA supports only 1x1, groups=1 convolutions (use "
                "method='lora' for the others, or leave this module out of target_modules)")
    elif not (isinstance(module, nn.Linear) or _is_conv1d(module)):
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(module).__name__}; SRLoRA supports nn.Linear, "
            "transformers' Conv1D and 1x1 nn.Conv2d (leave it out of target_modules, or use "
            "method='lora')")
    w = getattr(module, "weight", None)
    cls = type(w).__name__ if w is not None else "None"
    if w is None or cls in ("Params4bit", "Int8Params") or w.dtype not in FLOAT_DTYPES:
        raise UnsupportedModuleError(
            f"target module {name!r} has a {cls} weight of dtype {getattr(w, 'dtype', None)}; "
            "SRLoRA fuses updates into the frozen weight and needs it in float32, bfloat16 or "
            "float16. Load the model unquantized (e.g. dtype=torch.bfloat16) and quantize the "
            "merged result after training, or use method='lora' for QLoRA")


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
        return (self.layer.get_base_layer(), self.layer.lora_A[self.adapter],
                self.layer.lora_B[self.adapter])

    @property
    def base_weight(self) -> nn.Parameter:
        return self._modules[0].weight

    @property
    def lora_A(self) -> nn.Parameter:
        return self._modules[1].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self._modules[2].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def r(self) -> int:
        return int(self.layer.r[self.adapter])

    def W(self) -> torch.Tensor:
        """The frozen weight as an ``m x n`` view (out x in) of the live parameter."""
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
        return tuple(self.W().shape)  # type: ignore[return-value]
