"""The engine checks a switching controller runs: when an optimizer is bound, and before every
switch. FSDP2 is accepted with ``fusion="virtual"`` and strategies that declare they run sharded
(:mod:`srlora.fsdp_checks`); FSDP1 and DeepSpeed are refused (:mod:`srlora.engines`), naming
what works. The guard says when the model is sharded; the controller then binds to the shards.
"""

from __future__ import annotations

from typing import Callable

from . import fsdp_checks
from .engines import check_engine, is_fsdp2, sharding_reason


class EngineGuard:
    def __init__(self, model, config, layers: list):
        self.model, self.config, self.layers = model, config, layers
        self._walked = None  # the edited parameters at the last model walk
        self._fsdp2 = False  # FSDP2 (accepted) found at the last model walk

    def at_bind(self, optimizer) -> bool:
        """Check the engine of a run with ``optimizer`` (raises UnsupportedEngineError naming
        it); True when the model is sharded by FSDP2 (the caller binds to its shards)."""
        fsdp2 = is_fsdp2(sharding_reason(self.model, optimizer))
        shard = False
        if fsdp2:  # fusion="virtual"; sharded: dim-0 shards. Else refused, naming why
            fsdp_checks.check_fusion(self.config)
            fsdp_checks.check_variants(self.config)
            shard = fsdp_checks.is_sharded_model(self.model, self.layers)
            if shard:
                fsdp_checks.check(self.config, self.layers)
        check_engine(self.model, optimizer, fsdp2_ok=fsdp2)  # FSDP1 / DeepSpeed: refused
        return shard

    def before_switch(self, bind: Callable[[], None]) -> None:
        """Refuse a sharded engine (FSDP, DeepSpeed) before a switch edits anything; ``bind()``
        when the model was sharded by FSDP2 since set-up or attach.

        Every switch checks the launcher and each parameter it edits (DTensor, flat or ZeRO-3
        partitioned); the whole model is walked again only when those parameters are not the
        objects seen at the last walk (FSDP and FSDP2 replace them when they wrap a model; the
        old ones are held, so their ids cannot be reused). Walking the model cost 45 ms of a
        130 ms switch on the 144-module bench shape.
        """
        edited = [p for L in self.layers for p in (L.base_weight, L.lora_A, L.lora_B)]
        seen = self._walked
        if (
            seen is None
            or len(seen) != len(edited)
            or any(a is not b for a, b in zip(seen, edited))
        ):
            fsdp2 = is_fsdp2(sharding_reason(self.model))
            if fsdp2:  # sharded since set-up or attach: bind, unless refused
                fsdp_checks.check_fusion(self.config)
                if fsdp_checks.is_sharded_model(self.model, self.layers):
                    bind()
            check_engine(self.model, fsdp2_ok=fsdp2)
            self._walked, self._fsdp2 = edited, fsdp2
        check_engine(params=edited, fsdp2_ok=self._fsdp2)
