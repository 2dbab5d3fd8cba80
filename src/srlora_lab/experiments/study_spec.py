"""The spec of ``srlora study``: a YAML file read, checked and resolved into plain dicts.

Every problem raises :class:`SpecError` naming the key path (``tasks[2].steps``) before anything
runs or is written. :func:`load` returns the *resolved* spec: every task with all its settings
(the built-in task's defaults filled in), every method with its SRLoRAConfig fields, each
(task, method) learning-rate grid, the selection and final phases, margins and pairs. That
resolved form is what ``DIR/spec.json`` holds and what ``--resume`` compares.

Layout (see docs/study.md)::

    name: paper-claims
    lrs: [3e-4, 1e-3, 3e-3]          # shared grid, or {method: [...]}
    selection: {seeds: [100, 101], steps_frac: 0.5}
    final: {seeds: [0, 1, 2, 3, 4]}
    margins: {accuracy: 0.5, loss_rel: 0.02}
    pairs: [[srlora, lora], [srlora, pissa]]   # default: every pair of methods
    methods:
      - lora                                    # a name that is also a base method
      - {name: srlora-keep, method: srlora, optimizer_state: keep}
      - {name: dora, method: dora}              # lora + extra_lora_kwargs {use_dora: true}
      - srlora:protect:rewarm                   # as srlora compare --methods writes it
    tasks:
      - {name: rt-polarity, steps: 600, lrs: {pissa: [1e-4, 3e-4, 1e-3]}}
      - {name: tiny, dataset: data.csv, model: ./tiny-bert}   # a local dataset and model
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

# SRLoRAConfig fields the harness sets itself (from the task and the model): HARNESS_FIELDS
from .methods import HARNESS_FIELDS, LAB_METHODS, SHORTHANDS, MethodError, all_methods, parse_method

# run settings a task entry (or the spec's ``defaults``) may set; see srlora compare --help
TASK_KEYS = {
    "steps": int,
    "batch_size": int,
    "eval_every": int,
    "eval_size": int,
    "max_train": int,
    "max_val": int,
    "max_test": int,
    "max_len": int,
    "image_size": int,
    "r": int,
    "lora_alpha": float,
    "r_target": int,
    "gamma": float,
    "head_lr": float,
    "warmup": float,
    "schedule": str,
    "split_seed": int,
    "model": str,
    "target_modules": list,
}
TOP_KEYS = (
    "name",
    "lrs",
    "selection",
    "final",
    "margins",
    "pairs",
    "methods",
    "tasks",
    "defaults",
    "smoke",
    "description",
    "confirmatory",
    "headroom",
    "records",
)
MIN_SELECTION_SEEDS, MIN_LRS, MIN_FINAL_SEEDS = 2, 3, 5
DEFAULT_MARGINS = {"accuracy": 0.5, "loss_rel": 0.02}


class SpecError(Exception):
    """A study spec is malformed; the message names the key path."""


def _fail(path: str, why: str) -> None:
    raise SpecError(f"{path}: {why}")


def _mapping(v: Any, path: str, allowed: tuple) -> dict:
    if not isinstance(v, dict):
        _fail(path, f"expected a mapping, got {type(v).__name__}")
    unknown = sorted(str(k) for k in v if k not in allowed)
    if unknown:
        _fail(f"{path}.{unknown[0]}", f"unknown key (allowed: {', '.join(allowed)})")
    return v


def _int(v: Any, path: str, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(path, f"expected an integer, got {v!r}")
    if lo is not None and v < lo:
        _fail(path, f"must be >= {lo}, got {v}")
    return v


def _pos(v: Any, path: str) -> float:
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            _fail(path, f"expected a positive number, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        _fail(path, f"expected a positive number, got {v!r}")
    return float(v)


def _seeds(v: Any, path: str, least: int) -> list[int]:
    if not isinstance(v, list) or not v:
        _fail(path, f"expected a non-empty list of integer seeds, got {v!r}")
    seeds = [_int(s, f"{path}[{i}]", 0) for i, s in enumerate(v)]
    if len(set(seeds)) != len(seeds):
        _fail(path, f"a seed is named twice: {seeds}")
    if len(seeds) < least:
        _fail(path, f"needs at least {least} seeds, got {len(seeds)} (or set smoke: true)")
    return seeds


def _grid(v: Any, path: str, least: int) -> list[float]:
    if not isinstance(v, list) or not v:
        _fail(path, f"expected a non-empty list of learning rates, got {v!r}")
    lrs = [_pos(x, f"{path}[{i}]") for i, x in enumerate(v)]
    if len(set(lrs)) != len(lrs):
        _fail(path, f"a learning rate is named twice: {lrs}")
    if len(lrs) < least:
        _fail(path, f"needs at least {least} learning rates, got {len(lrs)} (or set smoke: true)")
    return sorted(lrs)


def _lr_table(v: Any, path: str, names: list[str], least: int) -> dict:
    """A shared grid (list) or {method name: grid}: returns {name: grid} for the names given."""
    if isinstance(v, list):
        g = _grid(v, path, least)
        return {n: g for n in names}
    if not isinstance(v, dict):
        _fail(path, f"expected a list of learning rates or a mapping method -> list, got {v!r}")
    for k in v:
        if k not in names:
            _fail(f"{path}.{k}", f"not a method of this spec ({', '.join(names)})")
    return {k: _grid(g, f"{path}.{k}", least) for k, g in v.items()}


def _method(v: Any, path: str) -> dict:
    import srlora

    if isinstance(v, str) and ":" in v:  # srlora:rewarm, srlora:selection=protect, ...
        try:
            name, base, config = parse_method(v)
        except MethodError as e:
            _fail(path, str(e))
        if "/" in name:
            _fail(path, f"expected a plain name (no '/'), got {name!r}")
        return {"name": name, "method": base, "config": config}
    if isinstance(v, str):
        v = {"name": v}
    if not isinstance(v, dict):
        _fail(path, f"expected a method name or a mapping, got {v!r}")
    fields = set(srlora.SRLoRAConfig.__dataclass_fields__) - set(HARNESS_FIELDS)
    allowed = ("name", "method", "lrs") + tuple(sorted(fields))
    _mapping(v, path, allowed)
    name = v.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        _fail(f"{path}.name", f"expected a plain name (no '/'), got {name!r}")
    base = v.get("method", name)
    if base not in all_methods():
        _fail(f"{path}.method", f"unknown method {base!r} (choose from {', '.join(all_methods())})")
    config = {k: x for k, x in v.items() if k not in ("name", "method", "lrs")}
    if base in LAB_METHODS:
        if config:
            _fail(
                f"{path}.{sorted(config)[0]}",
                f"method {base!r} has no adapter: it takes no adapter settings",
            )
        return {"name": name, "method": base, "config": {}}
    extra = config.get("extra_lora_kwargs", {})
    if not isinstance(extra, dict):
        _fail(f"{path}.extra_lora_kwargs", f"expected a mapping, got {extra!r}")
    if base in SHORTHANDS:
        base, flags = SHORTHANDS[base]
        config["extra_lora_kwargs"] = {**flags, **extra}
    try:
        srlora.SRLoRAConfig(method=base, **config)
    except (ValueError, TypeError) as e:
        msg = str(e)
        key = next((k for k in sorted(config, key=len, reverse=True) if f".{k}:" in msg), None)
        _fail(f"{path}.{key}" if key else path, msg)
    return {"name": name, "method": base, "config": config}


def _task(v: Any, path: str, defaults: dict, spec_dir: str) -> dict:
    from .tasks import CUSTOM_DEFAULTS, TASKS

    if isinstance(v, str):
        v = {"name": v}
    _mapping(v, path, ("name", "dataset", "lrs", "selection_steps") + tuple(TASK_KEYS))
    name = v.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        _fail(f"{path}.name", f"expected a plain name (no '/'), got {name!r}")
    dataset = v.get("dataset")
    if dataset is not None:
        if not isinstance(dataset, str):
            _fail(f"{path}.dataset", f"expected a file path, got {dataset!r}")
        dataset = os.path.normpath(os.path.join(spec_dir, dataset))
        if not os.path.isfile(dataset):
            _fail(f"{path}.dataset", f"no such file: {dataset}")
        base, model = dict(CUSTOM_DEFAULTS), "minilm"
    elif name in TASKS:
        base, model = dict(TASKS[name].defaults), TASKS[name].model
    else:
        _fail(
            f"{path}.name",
            f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)} (or give a dataset: file)",
        )
    base.pop("lr", None), base.pop("seeds", None)
    base["model"] = model
    for key, val in itertools.chain(defaults.items(), v.items()):
        if key not in TASK_KEYS:
            continue
        where = f"{path}.{key}" if key in v else f"defaults.{key}"
        typ = TASK_KEYS[key]
        if val is None and key in (
            "max_train",
            "max_val",
            "max_test",
            "eval_size",
            "head_lr",
            "target_modules",
        ):
            base[key] = None
        elif typ is int:
            base[key] = _int(
                val,
                where,
                2
                if key == "max_len"
                else 0
                if key == "split_seed"
                else 16
                if key == "image_size"
                else 1,
            )
        elif typ is float:
            if key == "warmup":
                if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val < 1:
                    _fail(where, f"must be in [0, 1), got {val!r}")
                base[key] = float(val)
            else:
                base[key] = _pos(val, where)
        elif typ is list:
            if not isinstance(val, list) or not val or not all(isinstance(x, str) for x in val):
                _fail(where, f"expected a non-empty list of module names, got {val!r}")
            base[key] = list(val)
        else:
            if not isinstance(val, str):
                _fail(where, f"expected a string, got {val!r}")
            if key == "schedule" and val not in ("constant", "linear"):
                _fail(where, f"must be constant or linear, got {val!r}")
            base[key] = val
    if key_model := v.get("model"):
        from .models import BUILTIN

        if key_model not in BUILTIN:
            base["model"] = (
                os.path.normpath(os.path.join(spec_dir, key_model))
                if os.path.exists(os.path.join(spec_dir, key_model))
                else key_model
            )
    base.setdefault("target_modules", None)
    if (
        v.get("lora_alpha") is None
        and defaults.get("lora_alpha") is None
        and ("r" in v or "r" in defaults)
    ):
        base["lora_alpha"] = 2.0 * base["r"]  # as srlora compare: alpha follows a given r
    steps = base["steps"]
    quarter = max(1, steps // 4)
    if base["eval_every"] > quarter:
        _fail(
            f"{path}.eval_every",
            f"{base['eval_every']} is over a quarter of steps={steps}; "
            f"the early held-out loss needs a curve point by step "
            f"{quarter}",
        )
    sel = v.get("selection_steps")
    base["selection_steps"] = None if sel is None else _int(sel, f"{path}.selection_steps", 1)
    return {"name": name, "dataset": dataset, **base}


def parse(raw: Any, spec_dir: str = ".") -> dict:
    """Check a spec (the YAML's mapping) and resolve it; raises SpecError naming the key."""
    _mapping(raw, "spec", TOP_KEYS)
    smoke = raw.get("smoke", False)
    if not isinstance(smoke, bool):
        _fail("smoke", f"expected true or false, got {smoke!r}")
    least = (1, 1, 1) if smoke else (MIN_SELECTION_SEEDS, MIN_LRS, MIN_FINAL_SEEDS)
    for key in ("methods", "tasks"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            _fail(key, "expected a non-empty list")
    methods = [_method(m, f"methods[{i}]") for i, m in enumerate(raw["methods"])]
    names = [m["name"] for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        _fail("methods", f"method name {dup[0]!r} is used twice")
    defaults = raw.get("defaults", {}) or {}
    _mapping(defaults, "defaults", tuple(TASK_KEYS))
    tasks = [_task(t, f"tasks[{i}]", defaults, spec_dir) for i, t in enumerate(raw["tasks"])]
    tnames = [t["name"] for t in tasks]
    dup = sorted({n for n in tnames if tnames.count(n) > 1})
    if dup:
        _fail("tasks", f"task {dup[0]!r} is named twice")

    shared = _lr_table(raw["lrs"], "lrs", names, least[1]) if "lrs" in raw else {}
    for i, (m, rm) in enumerate(zip(methods, raw["methods"])):
        if isinstance(rm, dict) and "lrs" in rm:
            shared[m["name"]] = _grid(rm["lrs"], f"methods[{i}].lrs", least[1])
    for i, (t, rt) in enumerate(zip(tasks, raw["tasks"])):
        own = (
            _lr_table(rt["lrs"], f"tasks[{i}].lrs", names, least[1])
            if isinstance(rt, dict) and "lrs" in rt
            else {}
        )
        t["lrs"] = {}
        for n in names:
            grid = own.get(n) or shared.get(n)
            if grid is None:
                _fail(
                    f"tasks[{i}].lrs",
                    f"no learning-rate grid for method {n!r} (give lrs: at "
                    "the top, in the method or in the task)",
                )
            t["lrs"][n] = grid

    sel = _mapping(raw.get("selection"), "selection", ("seeds", "steps_frac"))
    fin = _mapping(raw.get("final"), "final", ("seeds",))
    frac = sel.get("steps_frac", 1.0)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        _fail("selection.steps_frac", f"must be in (0, 1], got {frac!r}")
    selection = {
        "seeds": _seeds(sel.get("seeds"), "selection.seeds", least[0]),
        "steps_frac": float(frac),
    }
    final = {"seeds": _seeds(fin.get("seeds"), "final.seeds", least[2])}
    for t in tasks:
        if t["selection_steps"] is None:
            t["selection_steps"] = max(1, int(round(frac * t["steps"])))
        if t["selection_steps"] > t["steps"]:
            _fail(
                f"tasks[{tnames.index(t['name'])}].selection_steps",
                f"{t['selection_steps']} is more than the task's steps ({t['steps']})",
            )
    margins = dict(DEFAULT_MARGINS)
    for k, x in _mapping(raw.get("margins", {}) or {}, "margins", tuple(DEFAULT_MARGINS)).items():
        margins[k] = _pos(x, f"margins.{k}")

    if "pairs" in raw:
        if not isinstance(raw["pairs"], list) or not raw["pairs"]:
            _fail("pairs", "expected a non-empty list of [a, b] method pairs")
        pairs = []
        for i, p in enumerate(raw["pairs"]):
            if not (isinstance(p, list) and len(p) == 2):
                _fail(f"pairs[{i}]", f"expected [a, b], got {p!r}")
            for j, n in enumerate(p):
                if n not in names:
                    _fail(f"pairs[{i}][{j}]", f"{n!r} is not a method of this spec")
            if p[0] == p[1]:
                _fail(f"pairs[{i}]", f"compares {p[0]!r} with itself")
            pairs.append([p[0], p[1]])
    else:
        pairs = [[a, b] for a, b in itertools.combinations(names, 2)]
    name = raw.get("name", "study")
    if not isinstance(name, str):
        _fail("name", f"expected a string, got {name!r}")
    out = {
        "name": name,
        "smoke": smoke,
        "methods": methods,
        "tasks": tasks,
        "selection": selection,
        "final": final,
        "margins": margins,
        "pairs": pairs,
    }
    records = raw.get("records", "compact")
    if records not in ("compact", "full"):
        _fail("records", f"must be compact or full, got {records!r}")
    if records == "full":
        out["records"] = "full"
    if "confirmatory" in raw:
        out["confirmatory"] = _confirmatory(raw["confirmatory"], names, tnames, pairs)
    if "headroom" in raw:
        out["headroom"] = _headroom(
            raw["headroom"], names, {m["name"]: m["method"] for m in methods}
        )
    return out


def _confirmatory(v: Any, names: list[str], tnames: list[str], pairs: list) -> list[dict]:
    """The comparisons declared before the runs, each with its prediction (Holm's family)."""
    if not isinstance(v, list) or not v:
        _fail("confirmatory", "expected a non-empty list of {task, a, b, metric, prediction}")
    out = []
    for i, c in enumerate(v):
        path = f"confirmatory[{i}]"
        _mapping(c, path, ("task", "a", "b", "metric", "prediction"))
        for k in ("task", "a", "b", "metric", "prediction"):
            if not isinstance(c.get(k), str) or not c[k].strip():
                _fail(f"{path}.{k}", f"expected a non-empty string, got {c.get(k)!r}")
        if c["task"] not in tnames:
            _fail(f"{path}.task", f"{c['task']!r} is not a task of this spec")
        for k in ("a", "b"):
            if c[k] not in names:
                _fail(f"{path}.{k}", f"{c[k]!r} is not a method of this spec")
        if [c["a"], c["b"]] not in pairs and [c["b"], c["a"]] not in pairs:
            _fail(path, f"[{c['a']}, {c['b']}] is not one of the spec's pairs")
        _metric(c["metric"], f"{path}.metric")
        out.append({k: c[k] for k in ("task", "a", "b", "metric", "prediction")})
    keys = [(c["task"], frozenset((c["a"], c["b"])), c["metric"]) for c in out]
    if len(set(keys)) != len(keys):
        _fail("confirmatory", "a comparison is declared twice")
    return out


def _metric(name: str, path: str) -> None:
    """A metric the verdicts can compute: a known one, or a record's ``*_loss`` /
    perplexity key."""
    from .study_verdicts import METRICS

    if name not in METRICS and not (name.endswith("_loss") or "perplexity" in name):
        _fail(path, f"unknown metric {name!r} (e.g. {', '.join(METRICS)}, final_perplexity)")


def _headroom(v: Any, names: list[str], bases: dict) -> list[dict]:
    """Which method is full fine-tuning, which LoRA(r) it is measured against, and which
    methods' recovered fraction of it to report (``bases``: method name -> base method)."""
    if not isinstance(v, list) or not v:
        _fail("headroom", "expected a non-empty list of {full, lora, methods, metrics}")
    out = []
    for i, h in enumerate(v):
        path = f"headroom[{i}]"
        _mapping(h, path, ("full", "lora", "methods", "metrics"))
        for k in ("full", "lora"):
            if h.get(k) not in names:
                _fail(f"{path}.{k}", f"{h.get(k)!r} is not a method of this spec")
        if bases.get(h["full"]) != "full":
            _fail(
                f"{path}.full",
                f"{h['full']!r} is not full fine-tuning (method: full): the "
                "headroom is measured from it",
            )
        if bases.get(h["lora"]) == "full":
            _fail(
                f"{path}.lora",
                f"{h['lora']!r} is full fine-tuning; name the adapter the "
                "headroom is measured against",
            )
        ms = h.get("methods", [])
        if not isinstance(ms, list) or any(m not in names for m in ms):
            _fail(f"{path}.methods", f"expected a list of this spec's methods, got {ms!r}")
        metrics = h.get("metrics", ["final_test_loss", "final_accuracy"])
        if (
            not isinstance(metrics, list)
            or not metrics
            or not all(isinstance(m, str) for m in metrics)
        ):
            _fail(f"{path}.metrics", f"expected a list of metric names, got {metrics!r}")
        for j, m in enumerate(metrics):
            _metric(m, f"{path}.metrics[{j}]")
        out.append(
            {"full": h["full"], "lora": h["lora"], "methods": list(ms), "metrics": list(metrics)}
        )
    return out


def load(path: str) -> dict:
    """Read and resolve the YAML spec at ``path`` (SpecError on any problem)."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse(raw, os.path.dirname(os.path.abspath(path)))


#: settings that only say how finished runs are compared: a study may change them on --resume
#: or --report (its runs stay the ones it would make), and the verdicts are recomputed
ANALYSIS_KEYS = ("pairs", "margins", "headroom")


def run_diff(old: dict, new: dict) -> list[str]:
    """Key paths where two resolved specs differ in what a run is (for --resume's refusal):
    every setting but :data:`ANALYSIS_KEYS`."""
    return diff(_run_settings(old), _run_settings(new))


def _run_settings(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ANALYSIS_KEYS}


def diff(old, new, path: str = "spec") -> list[str]:
    """Key paths where two resolved specs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            if k not in old or k not in new:
                out.append(f"{path}.{k}")
            else:
                out += diff(old[k], new[k], f"{path}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [path]
