"""srlora: SRLoRA (arXiv 2505.12433) on PEFT's LoRA layers, with LoRA and PiSSA baselines."""

from ._errors import (
    CheckpointMismatchError,
    SRLoRAError,
    SVDInputError,
    UnsupportedEngineError,
    UnsupportedModuleError,
)
from .config import SRLoRAConfig
from .controller import SRLoRAController
from .wrap import wrap
from .layers import keep_standard_4bit_layout
from .checkpoint import load_checkpoint, read_manifest, save_checkpoint
from .export import ExportResult, export_adapter, save_merged
from . import distributed

from ._version import __version__

__all__ = [
    "SRLoRAConfig",
    "SRLoRAController",
    "wrap",
    "SRLoRAError",
    "SVDInputError",
    "UnsupportedModuleError",
    "UnsupportedEngineError",
    "CheckpointMismatchError",
    "__version__",
    "save_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "export_adapter",
    "save_merged",
    "ExportResult",
    "distributed",
    "keep_standard_4bit_layout",
]
