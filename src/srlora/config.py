"""Typed configuration for SRLoRA and its baselines.

Every hyperparameter of the paper (arXiv 2505.12433) is a field here, and so is every choice the
paper leaves open (see docs/algorithm.md). Validation runs on construction, so a bad value raises
before any model weight is touched.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

# the methods srlora builds (the lab imports this list); "srlora" and "relora" switch
METHODS = ("srlora", "pissa", "lora", "relora")
SWITCHING = ("srlora", "relora")
# a method that is a preset of the switch's strategies: the fields it sets (a field not given
# takes the preset's value; another value given, even the field's default, is refused)
PRESETS = {
    "relora": {
        "gamma": 1.0,
        "insertion": "lora",
        "optimizer_state": "prune",
        "exhaustion": "extend",
    }
}
# the set-up choice fields' allowed values, here only; the switch steps' fields (selection,
# insertion, switch_schedule, exhaustion, optimizer_state) take the names of the strategies
# registered for them (srlora.strategies). choices() gives all of them.
CHOICES: dict[str, tuple] = {
    "method": METHODS,
    "importance_reset": ("module", "slots"),
    "svd_method": ("auto", "exact", "randomized"),
    "half_fusion": ("residual", "original", "inplace"),
    "fusion": ("weight", "virtual"),
}
# the method exactly as published (arXiv 2505.12433): SRLoRAConfig.paper() pins these
PAPER = {
    "method": "srlora",
    "beta1": 0.85,
    "beta2": 0.85,
    "importance_reset": "module",
    "optimizer_state": "zero",
    "selection": "importance",
    "switch_schedule": "fixed",
    "exhaustion": "stop",
    "insertion": "svd",
}
# fields that steer only the switches: a method that never switches warns once, naming them, when
# they are set (its r_target and gamma are range-checked only: the lab passes a task's r_target and
# gamma to every method alike)
SWITCH_FIELDS = (
    "beta1",
    "beta2",
    "switch_interval",
    "switch_span",
    "importance_reset",
    "optimizer_state",
    "selection",
    "switch_schedule",
    "exhaustion",
    "insertion",
    "adaptive_window",
    "adaptive_settled",
    "adaptive_plateau",
)


@dataclass
class SRLoRAConfig:
    """Configuration of one SRLoRA (or baseline) adapter.

    Methods: "srlora" (the paper, each switch step as the fields below choose), "pissa" and
    "lora" (the baselines: they never switch; setting a field that only steers switches warns
    once, naming it),
    "relora" (ReLoRA, Lialin et al. 2023: at each switch every pair is merged into the frozen
    weight and restarts as LoRA's init, the optimizer state of the restarted slots magnitude-
    pruned; a preset of the fields in ``PRESETS["relora"]``: gamma=1.0, insertion="lora",
    optimizer_state="prune", exhaustion="extend"; its jagged learning-rate schedule is the
    user's scheduler, examples/relora.py).

    Paper hyperparameters:
      r: LoRA rank, the number of trainable rank-1 pairs per module (trainable count never changes).
      lora_alpha: PEFT's alpha; the scaling is ``s = lora_alpha / r``.
      r_target: how many singular directions of each pretrained weight may be explored in a run.
      gamma: fraction of pairs recomposed at a switch; ``r' = round(gamma * r)``.
      beta1, beta2: EMA factors of the sensitivity and of its uncertainty (AdaLoRA's Eqs.).
      total_steps: optimizer steps of the run; switches land at ``k * (total_steps // (N+1))``,
        k = 1..N, with ``N = (r_target - r) // r'``. Or give ``switch_interval`` instead.

    Choices the paper leaves open (defaults from docs/algorithm.md):
      importance_reset: "module" zeroes a module's whole importance state after its switch (the
        paper's "reset the importance scores"); "slots" zeroes only the reinitialized pairs.
      optimizer_state: "zero" zeroes the optimizer moments of the reinitialized slices (ReLoRA);
        "keep" leaves them (GaLore); "prune" zeroes all but their largest 1% by magnitude
        (ReLoRA's magnitude pruning); "rewarm" zeroes them and counts Adam's bias correction of
        each restarted slot from its own restart, so its first update is at most the learning
        rate per element, as a fresh parameter's (torch Adam/AdamW only; srlora.rewarm).
      selection: which pairs a switch fuses. "importance" (the paper): the r' lowest pair scores.
        "protect": the same, but a slot written at the module's previous switch is fused only when
        too few older slots are left (a new direction gets one whole interval). "normalized": the
        lowest scores divided by the pair's squared scale ``(|B_j| |A_j|)^2`` (a pair's score
        grows with the square of its singular value, so a new, smaller direction is not fused
        for being small).
      svd_method: "exact" (torch.linalg.svd), "randomized" (seeded Halko et al. with
        ``svd_oversample`` extra columns and ``svd_niter`` power iterations), or "auto"
        (randomized unless the sketch would be as large as the matrix).
      svd_seed: seed of the randomized SVD's sketch (same result in every process).
      half_fusion: how a float16/bfloat16 base weight takes a switch's change (ignored for
        fp32 weights, which are updated in place). "residual" (default): beside the weight,
        an int8 residual of its last rounding (1 byte per weight element, on the weight's
        device) carries 8 more bits, so the change is applied to a ~16-bit-mantissa value and
        rounded once; no host transfer. "original": keep a copy of the original weight (on
        ``offload_device``) and rebuild the weight from it and all fused/subtracted factors in
        fp32 at every switch (one rounding, exact; moves the copy and the factors to the
        device at each switch). "inplace": round at every switch (the error grows).
      fusion: where a switch's change (and PiSSA's residual) goes. "weight" (default): into the
        frozen base weight. "virtual": the base weight is never written, not even at set-up; the
        residual, the fused pairs and the subtracted directions live in frozen low-rank factors
        (rank ``2p - r`` <= ``2K - r``, the weight's dtype and device) added to the LoRA layer's
        output by a forward hook: ``(2p - r)(m + n)`` more multiply-adds per token per module, a
        switch rewrites only those factors. ``half_fusion`` does not apply (no rounding of W).
        srlora and pissa only.
      switch_span: the fraction of the run in which the fixed schedule's N switches are made:
        at ``k * floor(switch_span * total_steps / N)``, k = 1..N, the last at about
        ``switch_span * total_steps``, the rest of the run training without switches (None: the
        paper's spread above, the last at ``N/(N+1)`` of the run). Not with ``switch_interval``
        or the adaptive schedule; needs ``total_steps`` (docs/algorithm.md section 4).
      switch_schedule: when switches fire (docs/algorithm.md section 4). "fixed" (the paper):
        at the steps above. "adaptive": the same budget of switches (as many as "fixed" plans),
        each fired once at least half the fixed interval has passed and either the pairs'
        ranking has settled (the r' pairs a switch would fuse unchanged over the last
        ``adaptive_window`` importance updates in at least ``adaptive_settled`` of the modules)
        or the training-loss EMA has plateaued (relative improvement below ``adaptive_plateau``
        over ``adaptive_window`` observed losses: ``controller.observe_loss``), else forced at
        twice the fixed interval or when the remaining switches would no longer fit. Each
        switch's history entry records its ``reason``. Needs ``total_steps``.
      exhaustion: what happens when a module's ``r_target`` directions are used up. "stop" (the
        paper): the module switches no more. "refresh": the next block (``r_target - r``
        directions) is the top of the SVD of the module's current frozen weight, appended to
        its SVD cache, and switching continues; with ``switch_interval`` the fixed schedule then
        runs to the end of training (needs ``total_steps``). "extend": as "refresh" with a block
        of slots without directions (for insertion="lora" only).
      insertion: which directions a recomposed slot takes. "svd" (the paper): the next unused
        singular directions of the pretrained weight. "gradient": the top singular directions
        of the part of the last step's full weight gradient that the kept slots cannot follow,
        at the scale the paper's direction would have had (srlora.insertion); the fixed
        schedule only. "lora": LoRA's init (B zero, A kaiming-uniform; nothing subtracted, no
        SVD computed; ReLoRA's restart).
      adaptive_window, adaptive_settled, adaptive_plateau: the adaptive schedule's window (in
        importance updates and in observed losses), fraction of modules whose ranking must be
        settled, and relative loss improvement below which the loss has plateaued.
      offload_device: where the SVD cache, the fused-pair ledger and the original copy live
        ("cpu" keeps accelerator memory at LoRA's level; None keeps them beside the weight).
    """

    r: int = 8
    lora_alpha: float = 16.0
    r_target: int = 64
    gamma: float = 0.5
    beta1: float = 0.85
    beta2: float = 0.85
    total_steps: Optional[int] = None
    switch_interval: Optional[int] = None
    switch_span: Optional[float] = None
    target_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    lora_dropout: float = 0.0
    method: str = "srlora"
    importance_reset: str = "module"
    optimizer_state: str = "zero"
    selection: str = "importance"
    svd_method: str = "auto"
    svd_oversample: int = 16
    svd_niter: int = 4
    svd_seed: int = 0
    half_fusion: str = "residual"
    fusion: str = "weight"
    switch_schedule: str = "fixed"
    exhaustion: str = "stop"
    insertion: str = "svd"
    adaptive_window: int = 10
    adaptive_settled: float = 0.9
    adaptive_plateau: float = 0.01
    offload_device: Optional[str] = "cpu"
    extra_lora_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the fields the caller gave (recorded by __init__, below the class); from here on a
        # field set is added to them (__setattr__)
        self.__dict__["_given"] = self.__dict__.pop("_given_now", set(_DEFAULTS))
        self.validate()

    def __setattr__(self, name: str, value) -> None:
        # a field set after construction counts as given (a preset must not quietly undo it)
        if "_given" in self.__dict__ and name in _DEFAULTS:  # a new set: a copy's is its own
            self.__dict__["_given"] = self.__dict__["_given"] | {name}
        super().__setattr__(name, value)

    def validate(self) -> None:
        """Check every field (``srlora.wrap`` calls it again: a field changed after construction
        is checked before any model change). Raises ValueError naming the field."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"SRLoRAConfig.{name}: {why}")

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"must be an integer >= {lo}{' or None' if optional else ''}, got {v!r}")

        def number(name: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
            v = getattr(self, name)
            ok = (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and (lo < v if lo_open else lo <= v)
                and (v < hi if hi_open else v <= hi)
            )
            if not ok:
                bad(
                    name,
                    f"must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                    f"{')' if hi_open else ']'}, got {v!r}",
                )

        self._apply_preset()
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed:
                from .strategies import STEP_FIELDS

                mine = (
                    (
                        " (a strategy of your own: import the module that registers it first, "
                        "docs/extending.md)"
                    )
                    if name in STEP_FIELDS
                    else ""
                )
                bad(name, f"must be one of {allowed}, got {getattr(self, name)!r}{mine}")
        integer("r", 1)
        number("lora_alpha", 0.0, math.inf, True, True)
        number("beta1", 0.0, 1.0, False, True)
        number("beta2", 0.0, 1.0, False, True)
        number("lora_dropout", 0.0, 1.0, False, True)
        if self.fusion == "virtual" and self.method == "lora":
            bad(
                "fusion",
                "'virtual' applies to method 'srlora' or 'pissa' (LoRA never writes "
                "the base weight)",
            )
        integer("adaptive_window", 1)
        number("adaptive_settled", 0.0, 1.0, True, False)
        number("adaptive_plateau", 0.0, math.inf, False, True)
        integer("svd_oversample", 0)
        integer("svd_niter", 0)
        integer("svd_seed", 0)
        self._check_offload_device()
        tm = self.target_modules
        if tm is not None and not (
            isinstance(tm, str)
            or (isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm))
        ):
            bad(
                "target_modules",
                f"must be a list of module names, a regex string or None, got {tm!r}",
            )
        if tm is not None and len(tm) == 0:
            bad("target_modules", "must name at least one module (or be None for PEFT's defaults)")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, (list, tuple))
            and all(isinstance(t, str) for t in self.modules_to_save)
        ):
            bad(
                "modules_to_save",
                f"must be a list of module names or None, got {self.modules_to_save!r}",
            )
        if not isinstance(self.extra_lora_kwargs, dict):
            bad(
                "extra_lora_kwargs",
                f"must be a dict of peft.LoraConfig fields, "
                f"got {type(self.extra_lora_kwargs).__name__}",
            )
        integer("total_steps", 1, optional=True)
        integer("switch_interval", 1, optional=True)
        if self.switch_span is not None:
            number("switch_span", 0.0, 1.0, True, False)
        number("gamma", 0.0, 1.0, True, False)
        integer("r_target", self.r if self.switches else 1)
        if not self.svd_init:
            self._warn_once(
                "svd",
                [
                    k
                    for k in ("svd_method", "svd_oversample", "svd_niter")
                    if getattr(self, k) != _DEFAULTS[k]
                ],
                "no SVD is computed: the adapter starts as LoRA's init",
            )
        if self.fusion == "virtual" or self.method == "lora":
            self._warn_once(
                "half",
                ["half_fusion"] if self.half_fusion != _DEFAULTS["half_fusion"] else [],
                "the base weight is never written",
            )
        if not self.switches:  # a method that never switches ignores the switching fields set
            self._warn_once(
                "method",
                [k for k in SWITCH_FIELDS if getattr(self, k) != _DEFAULTS[k]],
                f"method={self.method!r} never switches; use method='srlora' to switch",
            )
            return
        if self.r_prime == 0:
            bad(
                "gamma",
                f"round(gamma * r) = round({self.gamma} * {self.r}) = 0 pairs per switch; "
                "raise gamma or r",
            )
        if self.switch_span is not None and self.switch_interval is not None:
            bad(
                "switch_span",
                "sets the interval from the run's length; give it or switch_interval, not both",
            )
        from .strategies import check_config, ignored_fields

        check_config(self)  # the strategies' declared needs and conflicts, in one place
        unread = ignored_fields(self, _DEFAULTS)
        self._warn_once(
            "strategy", list(unread), "read only by " + ", ".join(sorted(set(unread.values())))
        )
        if self.r_prime == self.r:  # every pair is fused: no selection is made
            self._warn_once(
                "selection",
                ["selection"] if self.selection != _DEFAULTS["selection"] else [],
                f"round(gamma * r) = r = {self.r}: every pair is fused "
                "at each switch, so there is nothing to select",
            )

    def _warn_once(self, key: str, names: list, why: str) -> None:
        """Once per config and set of fields: warn that ``names`` (set) are ignored, and why."""
        set_ = [f"{k}={getattr(self, k)!r}" for k in names]
        if set_ and self.__dict__.get(f"_warned_{key}") != set_:
            self.__dict__[f"_warned_{key}"] = set_
            warnings.warn(
                f"SRLoRAConfig: {', '.join(set_)} {'is' if len(set_) == 1 else 'are'}"
                f" ignored ({why})",
                UserWarning,
                stacklevel=_user_level(),
            )

    def _apply_preset(self) -> None:
        """A preset method's fields: set where not given (left at the default), refused where
        given otherwise, even when the value given is the field's default (gamma=0.5)."""
        given = self.__dict__.get("_given", set())
        for name, value in PRESETS.get(self.method, {}).items():
            have = getattr(self, name)
            if have == value:
                continue
            if name not in given and have == _DEFAULTS[name]:
                self.__dict__[name] = value  # not a given field: no _given entry
            else:
                raise ValueError(
                    f"SRLoRAConfig.{name}: method={self.method!r} sets {name}="
                    f"{value!r}, got {have!r}; use method='srlora' to combine "
                    "the steps freely"
                )

    def _check_offload_device(self) -> None:
        if self.offload_device is None:
            return
        import torch

        try:
            dev = torch.device(self.offload_device)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type == "meta":
            raise ValueError(
                f"SRLoRAConfig.offload_device: must be a torch device string that "
                f"holds data (e.g. 'cpu', 'cuda:0') or None, got "
                f"{self.offload_device!r}"
            )

    @property
    def switches(self) -> bool:
        """Does this method switch (recompose pairs during training)?"""
        return self.method in SWITCHING

    @property
    def svd_init(self) -> bool:
        """Do the slots start from the weight's top singular directions (PiSSA's init, which
        needs the SVD of every adapted weight)? For a switching method: when its insertion reads
        the SVD cache; else PEFT's LoRA init (B zero, A random) and no SVD."""
        if self.method in ("lora", "pissa"):
            return self.method == "pissa"
        from .strategies import get

        return get("insertion", self.insertion).reads_directions

    @classmethod
    def paper(cls, **fields) -> "SRLoRAConfig":
        """SRLoRA exactly as published: importance selection, the optimizer moments of new slots
        zeroed, the module's importance reset, a fixed schedule, AdaLoRA's betas 0.85. Other
        fields (r, r_target, target_modules, ...) are free; overriding a pinned one is refused."""
        pinned = sorted(set(fields) & set(PAPER))
        if pinned:
            raise ValueError(
                f"SRLoRAConfig.paper(): {pinned} are fixed by the paper; build "
                "SRLoRAConfig(...) directly to change them"
            )
        return cls(**PAPER, **fields)

    @property
    def r_prime(self) -> int:
        """Pairs recomposed per module at each switch: round(gamma * r)."""
        return int(round(self.gamma * self.r))

    @property
    def scaling(self) -> float:
        """PEFT's LoRA scaling s = lora_alpha / r."""
        return self.lora_alpha / self.r

    @property
    def num_switches(self) -> int:
        """N_switch = floor((r_target - r) / r'): switch events the schedule plans."""
        if not self.switches:
            return 0
        return (self.r_target - self.r) // self.r_prime

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SRLoRAConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SRLoRAConfig: unknown field(s) {unknown}")
        return cls(**d)


_DEFAULTS = {f.name: f.default for f in fields(SRLoRAConfig)}
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _user_level() -> int:
    """The ``stacklevel`` of a warning raised here that names the user's line: the first frame
    outside srlora and the dataclass's generated __init__."""
    level, f = 1, sys._getframe(1)
    while f is not None and (
        f.f_code.co_filename == "<string>"
        or os.path.abspath(f.f_code.co_filename).startswith(_PACKAGE + os.sep)
    ):
        f, level = f.f_back, level + 1
    return level


_FIELD_ORDER = [f.name for f in fields(SRLoRAConfig) if f.init]
_dataclass_init = SRLoRAConfig.__init__


@functools.wraps(_dataclass_init)
def _init_recording_given(self, *args, **kwargs) -> None:
    """The dataclass __init__, first recording which fields the caller gave (positionally or
    by name): a preset (``PRESETS``) fills only the fields not given."""
    self.__dict__["_given_now"] = set(_FIELD_ORDER[: len(args)]) | set(kwargs)
    _dataclass_init(self, *args, **kwargs)


SRLoRAConfig.__init__ = _init_recording_given


def choices() -> dict[str, tuple]:
    """Each choice field -> its allowed values (the step fields' from the strategy registry)."""
    from .strategies import STEP_FIELDS, names

    return CHOICES | {f: names(f) for f in STEP_FIELDS}
