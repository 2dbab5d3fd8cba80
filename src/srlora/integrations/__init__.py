"""Thin adapters between SRLoRA's controller and training frameworks."""

from .trainer import SRLoRACallback

__all__ = ["SRLoRACallback"]
