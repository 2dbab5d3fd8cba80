"""``srlora.wrap``: validate, put PEFT's LoRA layers in, and build the controller."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ._errors import SRLoRAError
from .config import SRLoRAConfig
from .controller import SRLoRAController, SVDFn
from .layers import AdaptedLayer, check_supported


def lora_config(config: SRLoRAConfig):
    """The peft.LoraConfig behind an SRLoRAConfig (init is SRLoRA's own except for 'lora')."""
    from peft import LoraConfig

    kw = dict(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
              lora_dropout=config.lora_dropout, modules_to_save=config.modules_to_save,
              init_lora_weights=True if config.method == "lora" else False)
    kw.update(config.extra_lora_kwargs)
    return LoraConfig(**kw)


def _targets(model: nn.Module, peft_config) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import check_target_module_exists

    return [(name, mod) for name, mod in model.named_modules()
            if name and check_target_module_exists(peft_config, name)]


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise SRLoRAError("SRLoRAConfig.target_modules: required for this model (PEFT has no "
                          f"default target modules for model type {model_type!r})")
    return list(defaults[model_type])


def wrap(model: nn.Module, config: SRLoRAConfig, adapter_name: str = "default",
         svd_fn: Optional[SVDFn] = None):
    """Add an SRLoRA (or LoRA / PiSSA baseline) adapter to ``model``.

    Returns ``(peft_model, controller)``: a ``peft.PeftModel`` with PEFT's own LoRA layers
    (adapter ``adapter_name``) and the :class:`SRLoRAController` that owns the schedule. Every
    check runs before the model is touched: a bad input raises and leaves it as it was.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(config, SRLoRAConfig):
        raise TypeError(f"config must be an SRLoRAConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        raise SRLoRAError("model is already a PeftModel; pass the base model to srlora.wrap()")
    if config.target_modules is None:
        from dataclasses import replace
        config = replace(config, target_modules=_default_targets(model))
    if config.method == "srlora":
        from .distributed import check_engine
        check_engine(model)  # FSDP / DeepSpeed: refused before the model is touched
    pcfg = lora_config(config)
    targets = _targets(model, pcfg)
    if any(type(m).__name__ == "Conv1D" for _, m in targets) and \
            "fan_in_fan_out" not in config.extra_lora_kwargs:
        pcfg.fan_in_fan_out = True  # GPT-2's Conv1D stores W transposed
    if not targets:
        raise SRLoRAError(f"SRLoRAConfig.target_modules = {config.target_modules!r} matches "
                          f"no module of {type(model).__name__}")
    if config.method != "lora":
        for name, mod in targets:
            check_supported(name, mod)
            if not torch.isfinite(mod.weight.detach()).all():
                from ._errors import SVDInputError
                raise SVDInputError(f"target module {name!r}: NaN/Inf in its weight; SRLoRA's "
                                    "SVD needs a finite weight")
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated alias; not ours
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        peft_model = get_peft_model(model, pcfg, adapter_name=adapter_name)
    from peft.tuners.lora import LoraLayer

    layers = [AdaptedLayer(name, mod, adapter_name) for name, mod in peft_model.named_modules()
              if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A]
    if config.method != "lora":
        for L in layers:
            check_supported(L.name, L.layer.get_base_layer())
    if svd_fn is None and config.method != "lora":
        from .distributed import default_svd_fn
        svd_fn = default_svd_fn(config)  # under torch.distributed: computed once, broadcast
    controller = SRLoRAController(peft_model, config, layers, svd_fn=svd_fn)
    return peft_model, controller
