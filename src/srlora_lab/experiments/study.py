"""``srlora study``: a paired, powered experiment (tasks x methods x lrs x seeds), its verdicts.

Per task, in the spec's order:
1. selection: every method at every lr of its grid, for the selection seeds, at the selection
   steps; each method's lr is chosen by the lowest mean validation loss over those seeds (ties:
   the higher mean validation accuracy, then the smaller lr);
2. final: every method at its chosen lr for the final seeds, at the task's steps.
A job is one run; its record goes to ``DIR/runs/<task>/<method>/lr=<lr>/steps=<n>/seed=<s>.json``
(written atomically), so a run shared by both phases (same lr, steps and seed) runs once, and
``--resume`` skips every run whose file exists. ``DIR/study.json`` is rewritten (atomically)
after every finished run, with the verdicts of what is complete.

The scheduler hands out jobs in order (the first task's selection, then its final runs as soon
as a method's lr is chosen, then the next task), at most ``jobs`` at a time; with ``jobs > 1``
they run in spawned worker processes (see study_jobs.init_worker).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from typing import Callable, Optional

from . import study_jobs
from .fingerprint import record_id
from .records import RecordError, lr_text, read_record, set_aside
from .family import confirmatory, headroom
from .study_verdicts import claims, compare, early_point, metrics_of
from .switch_gaps import pair_gaps

# per run, from its diagnostics summary: effective rank of W_final - W0 (mean over modules), and
# for SRLoRA the share of inserted directions that outlived one interval, the fused pairs' age
# (median, steps) and how far training moved them (median, relative to their initial product)
MECHANISM = ("erank_mean", "survived_frac", "age_median", "moved_median")

CRITERION = (
    "lowest mean validation loss over the selection seeds; ties: higher mean "
    "validation accuracy, then the smaller lr"
)


def run_file(out: str, task: str, method: str, lr: float, steps: int, seed: int) -> str:
    return os.path.join(
        out, "runs", task, method, f"lr={lr_text(lr)}", f"steps={steps}", f"seed={seed}.json"
    )


def reuse_runs(spec: dict, out: str, other: str, fingerprint: Optional[str] = None) -> dict:
    """Copy into ``out`` every finished run of the study in ``other`` that this study would run
    identically: the same task (every resolved setting but the lr grids), the same method (name,
    base method and SRLoRAConfig fields), an lr of this study's grid, and the selection or final
    steps and seeds of this study. Files already in ``out`` are kept. Reads ``other/spec.json``;
    returns {"copied": n, "skipped": {reason: n}}. Runs are deterministic per seed on one
    machine (the ``--jobs 2`` test), not across machines, so with ``fingerprint`` (this machine's
    id) only records made on an equal machine are copied; a record without a fingerprint (made
    before they existed) or with another is skipped and counted."""
    import json
    import shutil

    with open(os.path.join(other, "spec.json")) as f:
        theirs = json.load(f)
    strip = lambda t: {k: v for k, v in t.items() if k != "lrs"}
    their_tasks = {t["name"]: strip(t) for t in theirs["tasks"]}
    their_methods = {m["name"]: m for m in theirs["methods"]}
    copied, skipped = 0, {}
    for task in spec["tasks"]:
        if their_tasks.get(task["name"]) != strip(task):
            skipped["task differs or absent"] = skipped.get("task differs or absent", 0) + 1
            continue
        for m in spec["methods"]:
            if their_methods.get(m["name"]) != m:
                skipped["method differs or absent"] = skipped.get("method differs or absent", 0) + 1
                continue
            for lr in task["lrs"][m["name"]]:
                keys = [(task["selection_steps"], s) for s in spec["selection"]["seeds"]] + [
                    (task["steps"], s) for s in spec["final"]["seeds"]
                ]
                for steps, seed in keys:
                    src = run_file(other, task["name"], m["name"], lr, steps, seed)
                    dst = run_file(out, task["name"], m["name"], lr, steps, seed)
                    if os.path.exists(src) and not os.path.exists(dst):
                        if fingerprint is not None:
                            try:
                                theirs_fp = record_id(read_record(src))
                            except RecordError:
                                theirs_fp = "damaged"
                            if theirs_fp != fingerprint:
                                why = (
                                    "made on another machine"
                                    if theirs_fp not in (None, "damaged")
                                    else "damaged"
                                    if theirs_fp
                                    else "no machine fingerprint"
                                )
                                skipped[why] = skipped.get(why, 0) + 1
                                continue
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        shutil.copyfile(src, dst + ".tmp")
                        os.replace(dst + ".tmp", dst)
                        copied += 1
    return {"copied": copied, "skipped": skipped}


def other_machine_runs(out: str, fingerprint: str) -> list[str]:
    """Run files under ``out/runs`` not made on the machine ``fingerprint`` names (records
    without a fingerprint included; damaged ones are left to ``--resume``'s repair)."""
    found = []
    for root, _, files in os.walk(os.path.join(out, "runs")):
        for name in sorted(files):
            if name.endswith(".json"):
                path = os.path.join(root, name)
                try:
                    fp = record_id(read_record(path))
                except RecordError:
                    continue
                if fp != fingerprint:
                    found.append(os.path.relpath(path, out))
    return sorted(found)


def compact(rec: dict, out: str, path: str) -> dict:
    """A run's line in study.json: its identity and metrics, no per-step arrays."""
    c = {k: rec.get(k) for k in ("task", "name", "method", "lr", "seed", "steps", "failed")}
    c["file"] = os.path.relpath(path, out)
    c["fp"] = record_id(rec)
    if rec.get("copied_from"):  # a record copied by an earlier --reuse (compact_records.py)
        c["origin"] = rec["copied_from"]
    if rec.get("failed"):
        c["error"] = rec.get("error")
        return c
    c.update({k: rec.get(k) for k in ("val_accuracy", "num_switches", "wall_time_s")})
    c.update(metrics_of(rec))
    diag = (rec.get("diagnostics") or {}).get("summary") or {}
    mech = {k: diag[k] for k in MECHANISM if diag.get(k) is not None}
    if mech:  # the mechanism in numbers (experiments/diagnostics.py), for the report's table
        c["mechanism"] = mech
    pt = early_point(rec.get("eval_curve") or [], rec.get("steps") or 0)
    c["early_step"] = pt["step"] if pt else None
    return c


class Study:
    """The state of one study in ``out``: which runs are done, the lr choices, the verdicts."""

    def __init__(
        self,
        spec: dict,
        out: str,
        only: Optional[set] = None,
        only_methods: Optional[set] = None,
        repair: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.spec, self.out = spec, out
        # repair: a damaged record is set aside and its run done again (--resume); else it raises
        self.repair, self.log = repair, log
        # task and method names to run (None: all); the verdicts cover every task and method
        self.only, self.only_methods = only, only_methods
        self.runs: dict = {}  # (task, method, lr, steps, seed) -> compact record
        self._curves: dict = {}  # run file -> its train_loss and switch_steps (switch_gaps)

    def key_file(self, key) -> str:
        return run_file(self.out, *key)

    def load_done(self) -> int:
        """Read the run files already in ``out`` (for --resume); returns how many. Every record
        under ``out/runs`` is read once and checked: a damaged one raises RecordError, or with
        ``repair`` is moved aside (so its run is done again)."""
        records = self._read_all()
        n = 0
        for job in self.all_selection_jobs():
            n += self._load(job, records)
        for task in self.spec["tasks"]:
            for m in self.spec["methods"]:
                lr = self.chosen(task, m["name"])
                if lr is not None:
                    for s in self.spec["final"]["seeds"]:
                        key = (task["name"], m["name"], lr, task["steps"], s)
                        n += self._load(key, records)
        return n

    def _read_all(self) -> dict:
        """{path: record} for every sound record under ``out/runs``."""
        records = {}
        for root, _, files in os.walk(os.path.join(self.out, "runs")):
            for name in sorted(files):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(root, name)
                try:
                    records[path] = read_record(path)
                except RecordError as e:
                    if not self.repair:
                        raise
                    self.log(f"{e}; moved to {set_aside(path)} and run again")
        return records

    def _load(self, key, records: dict) -> int:
        path = self.key_file(key)
        if key in self.runs or path not in records:
            return 0
        self.runs[key] = compact(records[path], self.out, path)
        return 1

    # ------------------------------------------------------------------ plan
    def all_selection_jobs(self):
        sel = self.spec["selection"]["seeds"]
        for task in self.spec["tasks"]:
            for s in sel:
                for m in self.spec["methods"]:
                    for lr in task["lrs"][m["name"]]:
                        yield (task["name"], m["name"], lr, task["selection_steps"], s)

    def selection(self, task: dict, method: str) -> Optional[dict]:
        """The grid's means and the chosen lr, once every selection run of the method is done."""
        grid, rows = task["lrs"][method], []
        for lr in grid:
            recs = [
                self.runs.get((task["name"], method, lr, task["selection_steps"], s))
                for s in self.spec["selection"]["seeds"]
            ]
            if any(r is None for r in recs):
                return None
            ok = [r for r in recs if not r.get("failed")]
            mean = lambda k: (sum(r[k] for r in ok) / len(ok)) if len(ok) == len(recs) else None
            rows.append(
                {
                    "lr": lr,
                    "mean_val_loss": mean("val_loss"),
                    "mean_val_accuracy": mean("val_accuracy"),
                    "failed_seeds": [r["seed"] for r in recs if r.get("failed")],
                }
            )
        fine = [r for r in rows if r["mean_val_loss"] is not None]
        best = (
            min(
                fine, key=lambda r: (r["mean_val_loss"], -(r["mean_val_accuracy"] or 0.0), r["lr"])
            )["lr"]
            if fine
            else None
        )
        return {
            "grid": grid,
            "steps": task["selection_steps"],
            "seeds": self.spec["selection"]["seeds"],
            "rows": rows,
            "chosen": best,
        }

    def chosen(self, task: dict, method: str) -> Optional[float]:
        sel = self.selection(task, method)
        return sel["chosen"] if sel else None

    def ready(self) -> list:
        """Jobs not yet done, in the order they should run (those whose lr is unknown wait)."""
        out, seen = [], set()
        for task in self._to_run():
            for key in self.all_selection_jobs():
                if (
                    key[0] == task["name"]
                    and self._runs_method(key[1])
                    and key not in self.runs
                    and key not in seen
                ):
                    seen.add(key)
                    out.append(key)
            for s in self.spec["final"]["seeds"]:
                for m in self._methods_to_run():
                    lr = self.chosen(task, m["name"])
                    key = (task["name"], m["name"], lr, task["steps"], s)
                    if lr is not None and key not in self.runs and key not in seen:
                        seen.add(key)
                        out.append(key)
        return out

    def _to_run(self) -> list[dict]:
        return [t for t in self.spec["tasks"] if self.only is None or t["name"] in self.only]

    def _runs_method(self, name: str) -> bool:
        return self.only_methods is None or name in self.only_methods

    def _methods_to_run(self) -> list[dict]:
        return [m for m in self.spec["methods"] if self._runs_method(m["name"])]

    def pending_total(self) -> int:
        """Runs still to do (a final run that is also a selection run counts once), in the
        tasks this session runs."""
        names = {t["name"] for t in self._to_run()}
        sel = sum(
            1
            for k in self.all_selection_jobs()
            if k not in self.runs and k[0] in names and self._runs_method(k[1])
        )
        fin = 0
        for task in self._to_run():
            shared = (
                set(self.spec["selection"]["seeds"])
                if task["selection_steps"] == task["steps"]
                else set()
            )
            for m in self._methods_to_run():
                lr = self.chosen(task, m["name"])
                fin += sum(
                    1
                    for s in self.spec["final"]["seeds"]
                    if s not in shared
                    and (
                        lr is None
                        or (task["name"], m["name"], lr, task["steps"], s) not in self.runs
                    )
                )
        return sel + fin

    # ------------------------------------------------------------------ results
    def final_values(self, task: dict, method: str) -> dict:
        """seed -> metrics of the method's finished final runs at its chosen lr."""
        lr = self.chosen(task, method)
        if lr is None:
            return {}
        out = {}
        for s in self.spec["final"]["seeds"]:
            r = self.runs.get((task["name"], method, lr, task["steps"], s))
            if r is not None and not r.get("failed"):
                out[s] = r
        return out

    def verdicts(self) -> list[dict]:
        out = []
        n_final = len(self.spec["final"]["seeds"])
        for task in self.spec["tasks"]:
            for a, b in self.spec["pairs"]:
                ra, rb = self.final_values(task, a), self.final_values(task, b)
                # a seed pairs only runs made on one machine (equal fingerprints)
                other = sorted(s for s in set(ra) & set(rb) if ra[s].get("fp") != rb[s].get("fp"))
                ra = {s: r for s, r in ra.items() if s not in other}
                rb = {s: r for s, r in rb.items() if s not in other}
                names = [k for k in metrics_of_keys(ra) if k in metrics_of_keys(rb)]
                for metric in names:
                    va = {s: r[metric] for s, r in ra.items() if r.get(metric) is not None}
                    vb = {s: r[metric] for s, r in rb.items() if r.get(metric) is not None}
                    v = compare(task["name"], metric, a, b, va, vb, self.spec["margins"], n_final)
                    if v is not None:
                        if other:
                            v["unpaired_other_machine"] = other
                        if any(ra[s].get("origin") != rb[s].get("origin") for s in v["seeds"]):
                            v["mixed_sessions"] = True  # legacy runs: see study_report
                        out.append(v)
        return out

    def paired_values(self, task: dict, method: str, metric: str) -> dict:
        """seed -> (metric value, fingerprint id) of a method's finished final runs."""
        return {
            s: (r[metric], r.get("fp"))
            for s, r in self.final_values(task, method).items()
            if r.get(metric) is not None
        }

    def switch_gaps(self) -> list[dict]:
        """For each pair with one switching method (put on the ``a`` side; both: as given): the
        paired training-loss gaps around ``a``'s switches over the final seeds
        (experiments/switch_gaps.py), read from the full run files."""
        import json

        def full(recs: dict) -> dict:  # each run file read once per process
            out = {}
            for s, r in recs.items():
                if r["file"] not in self._curves:
                    with open(os.path.join(self.out, r["file"])) as f:
                        rec = json.load(f)
                    self._curves[r["file"]] = {
                        k: rec.get(k) for k in ("train_loss", "switch_steps")
                    }
                out[s] = self._curves[r["file"]]
            return out

        out = []
        for task in self.spec["tasks"]:
            for a, b in self.spec["pairs"]:
                ra, rb = self.final_values(task, a), self.final_values(task, b)
                switched = lambda recs: any(r.get("num_switches") for r in recs.values())
                if switched(rb) and not switched(ra):  # the switching method on a's side
                    a, b, ra, rb = b, a, rb, ra
                if not rb or not switched(ra):
                    continue
                g = pair_gaps(full(ra), full(rb))
                if g is not None:
                    out.append(
                        {
                            "task": task["name"],
                            "a": a,
                            "b": b,
                            "lr_a": self.chosen(task, a),
                            "lr_b": self.chosen(task, b),
                            **g,
                        }
                    )
        return out

    def summary(self, meta: dict, status: str, t0: float) -> dict:
        verdicts = self.verdicts()
        sel = {
            t["name"]: {m["name"]: self.selection(t, m["name"]) for m in self.spec["methods"]}
            for t in self.spec["tasks"]
        }
        family = confirmatory(self.spec.get("confirmatory") or [], verdicts)
        heads = [
            h
            for t in self.spec["tasks"]
            for spec_h in self.spec.get("headroom") or []
            for h in [headroom(t["name"], spec_h, lambda m, k, t=t: self.paired_values(t, m, k))]
            if h is not None
        ]
        return {
            "spec": self.spec,
            "meta": meta,
            "status": status,
            "confirmatory": family,
            "headroom": heads,
            "wall_time_s": time.time() - t0,
            "lr_selection": {"criterion": CRITERION, "tasks": sel},
            "runs": sorted(
                self.runs.values(),
                key=lambda r: (r["task"], r["name"], r["lr"], r["steps"], r["seed"]),
            ),
            "verdicts": verdicts,
            "switch_gaps": self.switch_gaps(),
            "claims": claims(verdicts, [t["name"] for t in self.spec["tasks"]]),
        }


def metrics_of_keys(by_seed: dict) -> list[str]:
    """Metric names present in every record of ``by_seed`` (a seed -> compact record map)."""
    from .study_verdicts import METRICS

    recs = list(by_seed.values())
    if not recs:
        return []
    extra = sorted(
        k
        for k in recs[0]
        if (k.endswith("_loss") or "perplexity" in k)
        and k not in METRICS
        and isinstance(recs[0][k], (int, float))
    )
    return [k for k in list(METRICS) + extra if all(r.get(k) is not None for r in recs)]


class _Inline:
    """A one-job 'pool' running jobs in this process (``--jobs 1``)."""

    def submit(self, fn, arg):
        fut = cf.Future()
        try:
            fut.set_result(fn(arg))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            if isinstance(e, KeyboardInterrupt):
                raise
            fut.set_exception(e)
        return fut

    def shutdown(self, **kw):
        pass


def _earlier_wall_time(path: str) -> float:
    """The wall time an earlier session of this study recorded (0 for a new study)."""
    import json

    try:
        with open(path) as f:
            return float(json.load(f).get("wall_time_s") or 0.0)
    except (OSError, ValueError):
        return 0.0


def make_pool(jobs: int, threads: int, gpus: int):
    if jobs == 1:
        study_jobs.init_worker(threads, None)
        if gpus:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
        return _Inline()
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = None
    if gpus:
        queue = ctx.Queue()
        for k in range(jobs):
            queue.put(k % gpus)
    return cf.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=ctx,
        initializer=study_jobs.init_worker,
        initargs=(threads, queue, os.getpid()),
    )


def run_study(
    spec: dict,
    out: str,
    meta: dict,
    jobs: int = 1,
    threads: int = 1,
    device: str = "cpu",
    gpus: int = 0,
    log: Callable[[str], None] = print,
    on_update: Optional[Callable[[dict], None]] = None,
    progress: bool = False,
    only: Optional[set] = None,
    only_methods: Optional[set] = None,
) -> dict:
    """Run every job not yet done in ``out`` (of the tasks in ``only`` and the methods in
    ``only_methods``, all when None) and
    return the final study.json content (status "finished" once every task is done, else
    "partial").

    ``study.json`` is rewritten after every finished run; ``on_update(summary)`` is called then
    (the CLI writes the plots and the table there at the end only)."""
    study = Study(spec, out, only, only_methods, repair=True, log=log)
    done = study.load_done()
    if done:
        log(f"resume: {done} finished run(s) found in {out}")
    path = os.path.join(out, "study.json")
    t0 = time.time() - _earlier_wall_time(path)  # wall_time_s counts every session
    study_jobs.write_json(path, study.summary(meta, "running", t0))
    tasks = {t["name"]: t for t in spec["tasks"]}
    methods = {m["name"]: m for m in spec["methods"]}
    pool = make_pool(jobs, threads, gpus)
    in_flight: dict = {}
    finished = 0
    try:
        while True:
            for key in study.ready():
                if len(in_flight) >= jobs:
                    break
                if key in in_flight.values():
                    continue
                task, method, lr, steps, seed = key
                job = {
                    "task": tasks[task],
                    "method": methods[method],
                    "lr": lr,
                    "steps": steps,
                    "full_records": spec.get("records") == "full",
                    "seed": seed,
                    "file": study.key_file(key),
                    "device": device,
                    "progress": progress and jobs == 1,
                    "desc": f"{task} {method} lr={lr:g} seed={seed}",
                }
                in_flight[pool.submit(study_jobs.execute, job)] = key
            if not in_flight:
                break
            done_now, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
            for fut in done_now:
                key = in_flight.pop(fut)
                rec = fut.result()
                study.runs[key] = compact(rec, out, study.key_file(key))
                finished += 1
                study_jobs.write_json(path, study.summary(meta, "running", t0))
                left = study.pending_total()
                what = (
                    "FAILED (" + rec.get("error", "")[:60] + ")"
                    if rec.get("failed")
                    else (
                        f"val loss {rec['val_loss']:.4f}  "
                        f"test acc {100 * rec['final_accuracy']:.2f}"
                        f"  test loss {rec['final_test_loss']:.4f}  {rec['wall_time_s']:.0f} s"
                        if rec.get("final_accuracy") is not None
                        else f"val loss {rec['val_loss']:.4f}  {rec['wall_time_s']:.0f} s"
                    )
                )
                log(
                    f"[{finished} done, {left} left] {key[0]} {key[1]} lr={key[2]:g} "
                    f"steps={key[3]} seed={key[4]}: {what}"
                )
    except BaseException as e:
        for fut in in_flight:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        status = (
            "interrupted"
            if isinstance(e, KeyboardInterrupt)
            else f"error: {type(e).__name__}: {e}"[:300]
        )
        study_jobs.write_json(path, study.summary(meta, status, t0))
        raise
    pool.shutdown()
    study.only = study.only_methods = None
    summary = study.summary(meta, "finished" if study.pending_total() == 0 else "partial", t0)
    study_jobs.write_json(path, summary)
    return summary
