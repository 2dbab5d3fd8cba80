"""Errors raised by srlora, each naming what is wrong."""


class SRLoRAError(ValueError):
    """Base class: a bad input detected before any state changed."""


class SVDInputError(SRLoRAError):
    """A weight cannot be decomposed (NaN or Inf values)."""


class UnsupportedModuleError(SRLoRAError):
    """A target module is of a layer type or dtype SRLoRA cannot adapt."""


class CheckpointMismatchError(SRLoRAError):
    """A checkpoint does not fit the objects it is loaded into."""


class UnsupportedEngineError(SRLoRAError):
    """The training engine shards the weights SRLoRA rewrites (FSDP, DeepSpeed ZeRO)."""
