"""``srlora.wrap``: validate, put PEFT's LoRA layers in, and build the controller."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ._errors import SRLoRAError, SVDInputError, UnsupportedModuleError
from .config import SRLoRAConfig
from .controller import SRLoRAController, SVDFn
from .distributed import default_svd_fn
from .engines import check_engine_at_wrap
from .guards import check_reachable_switches
from .layers import AdaptedLayer, bnb_kind, check_supported, keep_standard_4bit_layout
from .strategies import virtual_refused


# SRLoRAConfig's own fields: setting them again in extra_lora_kwargs would disagree with it
OWN_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "modules_to_save")
# the PEFT options that keep "the model after wrap computes what the base computed" with
# SRLoRA's own PiSSA init (method "srlora" / "pissa"); every other option is refused for them
SVD_INIT_OPTIONS = (
    "use_rslora",
    "fan_in_fan_out",
    "bias",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "alpha_pattern",
    "rank_pattern",
)


def check_extra_lora_kwargs(config: SRLoRAConfig) -> None:
    """Refuse PEFT options that clash with SRLoRA, naming them (before the model is touched).

    * SRLoRAConfig's own fields (``r``, ``lora_alpha``, ...): set them on the config;
    * for ``"srlora"`` and ``"pissa"``: any option that changes the init or the layer's function
      (``use_dora``, ``lora_bias``, ``init_lora_weights``, LoftQ/EVA/CorDA configs, ...), and for
      ``"srlora"`` per-module ranks (``rank_pattern``): the schedule and switch assume one rank;
    * for ``"lora"``: ``init_lora_weights=False`` (a random start, not the base model).
    """
    extra = config.extra_lora_kwargs
    own = [k for k in extra if k in OWN_FIELDS]
    if own:
        raise ValueError(
            f"SRLoRAConfig.extra_lora_kwargs: {own} are SRLoRAConfig fields; set "
            f"them there (e.g. SRLoRAConfig({own[0]}=...)), not in extra_lora_kwargs"
        )
    if config.method == "lora":
        if extra.get("init_lora_weights", True) is False:
            raise ValueError(
                "SRLoRAConfig.extra_lora_kwargs: init_lora_weights=False starts the "
                "adapter as a random change of the base model; leave it out (or "
                "use 'gaussian', 'pissa', 'olora', ...)"
            )
        return
    refused = [
        k
        for k in extra
        if k not in SVD_INIT_OPTIONS or (k == "rank_pattern" and config.switches and extra[k])
    ]
    if refused:
        why = (
            "per-module ranks are not supported by SRLoRA's schedule and switch (one r for "
            "every module)"
            if refused == ["rank_pattern"]
            else f"method={config.method!r} initializes the adapter itself (PiSSA) and keeps the "
            f"model's function at set-up; these PEFT options would change it"
        )
        raise ValueError(
            f"SRLoRAConfig.extra_lora_kwargs: {refused} refused: {why}. Accepted "
            f"with method={config.method!r}: {list(SVD_INIT_OPTIONS)}"
            f"{' (rank_pattern: pissa only)' if config.switches else ''}; "
            "method='lora' takes PEFT's other options (use_dora, olora, ...)"
        )


def lora_config(config: SRLoRAConfig):
    """The peft.LoraConfig behind an SRLoRAConfig (init is SRLoRA's own except for 'lora')."""
    from peft import LoraConfig

    kw = dict(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        modules_to_save=config.modules_to_save,
        init_lora_weights=not config.svd_init,
    )  # PiSSA's init is srlora's own
    kw.update(config.extra_lora_kwargs)
    try:
        return LoraConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"SRLoRAConfig.extra_lora_kwargs: peft.LoraConfig refused them: {e}"
        ) from None


class ModelSnapshot:
    """What PEFT's injection changes in a model, without copying a tensor: every module's child
    modules, every parameter's ``requires_grad`` and the model's attributes. ``restore()`` puts
    them back (the base layers that PEFT wrapped are the same objects, so their weights, untouched
    until the last step of ``wrap``, come back as they were)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.attrs = set(vars(model))

    def restore(self) -> None:
        for m, children in self.children:
            m._modules.clear()
            m._modules.update(children)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for k in set(vars(self.model)) - self.attrs:
            delattr(self.model, k)


def _targets(model: nn.Module, peft_config) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import check_target_module_exists

    return [
        (name, mod)
        for name, mod in model.named_modules()
        if name and check_target_module_exists(peft_config, name)
    ]


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise SRLoRAError(
            "SRLoRAConfig.target_modules: required for this model (PEFT has no "
            f"default target modules for model type {model_type!r})"
        )
    return list(defaults[model_type])


def _check_not_wrapped(model: nn.Module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        raise SRLoRAError("model is already a PeftModel; pass the base model to srlora.wrap()")
    tuned = next((n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if tuned is not None or hasattr(model, "peft_config"):
        raise SRLoRAError(
            f"model already holds PEFT adapter layers (e.g. {tuned!r}): it was "
            "wrapped before (srlora.wrap and get_peft_model change the base model in "
            "place). Wrap a fresh copy of the base model; a second adapter would "
            "re-initialize the first"
        )


def _check_usable_device(config: SRLoRAConfig) -> None:
    """``offload_device`` must be a device this process can allocate on (a valid name of an
    absent accelerator would fail inside the first switch)."""
    if config.offload_device is None or config.method == "lora":
        return
    try:
        torch.empty(0, device=config.offload_device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ValueError(
            f"SRLoRAConfig.offload_device: {config.offload_device!r} cannot hold "
            f"tensors in this process ({str(e).splitlines()[0]}); use 'cpu' or "
            "None (beside the weight)"
        ) from None


def wrap(
    model: nn.Module,
    config: SRLoRAConfig,
    adapter_name: str = "default",
    svd_fn: Optional[SVDFn] = None,
):
    """Add an SRLoRA (or LoRA / PiSSA baseline) adapter to ``model``.

    Returns ``(peft_model, controller)``: a ``peft.PeftModel`` with PEFT's own LoRA layers
    (adapter ``adapter_name``) and the :class:`SRLoRAController` that owns the schedule. Every
    check runs before the model is touched: a bad input raises and leaves it as it was; should
    anything fail later (PEFT's injection, the SVD, an allocation), PEFT's layers are taken out
    again before the error propagates, and the base weights are written only as the very last
    step.
    """
    from peft import get_peft_model

    if not isinstance(config, SRLoRAConfig):
        raise TypeError(f"config must be an SRLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config.validate()  # a field changed since construction is checked before any change
    _check_usable_device(config)
    _check_not_wrapped(model)
    check_extra_lora_kwargs(config)
    if config.target_modules is None:
        from dataclasses import replace

        config = replace(config, target_modules=_default_targets(model))
    if config.switches:
        check_engine_at_wrap(model, config.fusion)  # sharded already, FSDP1, DeepSpeed: refused
    pcfg = lora_config(config)
    targets = _targets(model, pcfg)
    if (
        any(type(m).__name__ == "Conv1D" for _, m in targets)
        and "fan_in_fan_out" not in config.extra_lora_kwargs
    ):
        pcfg.fan_in_fan_out = True  # GPT-2's Conv1D stores W transposed
    if not targets:
        raise SRLoRAError(
            f"SRLoRAConfig.target_modules = {config.target_modules!r} matches "
            f"no module of {type(model).__name__}"
        )
    if config.method != "lora":
        no_virtual = virtual_refused(config)
        for name, mod in targets:
            if no_virtual and config.fusion != "virtual" and bnb_kind(mod) is not None:
                raise UnsupportedModuleError(
                    f"target module {name!r} is a bitsandbytes {bnb_kind(mod)} layer "
                    f"({type(mod).__name__}): a quantized weight takes switches only through "
                    f"fusion='virtual', which {', '.join(no_virtual)} refuses "
                    f"(method={config.method!r}). Use method='lora' for QLoRA, or load the "
                    "model unquantized"
                )
            check_supported(name, mod, config.fusion)
            if config.svd_init and not torch.isfinite(mod.weight.detach()).all():
                raise SVDInputError(
                    f"target module {name!r}: NaN/Inf in its weight; SRLoRA's "
                    "SVD needs a finite weight"
                )
    if svd_fn is None and config.svd_init:
        svd_fn = default_svd_fn(config)  # under torch.distributed: computed once, broadcast
    snapshot = ModelSnapshot(model)
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated alias; not ours
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
            )
            peft_model = get_peft_model(model, pcfg, adapter_name=adapter_name)
        from peft.tuners.lora import LoraLayer

        layers = [
            AdaptedLayer(name, mod, adapter_name)
            for name, mod in peft_model.named_modules()
            if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A
        ]
        if config.method != "lora":
            for L in layers:
                check_supported(L.name, L.layer.get_base_layer(), config.fusion)
        controller = SRLoRAController(peft_model, config, layers, svd_fn=svd_fn)
    except BaseException:
        snapshot.restore()
        raise
    keep_standard_4bit_layout(peft_model)  # what srlora reads and exports stays readable
    check_reachable_switches(controller)  # r_target beyond the layers' directions: warned
    return peft_model, controller
