"""``srlora study SPEC.yaml --out DIR``: the paired, powered experiment described by a spec file.

Checks the spec, the output folder, every task's data and model and every adapter before any run;
then calls srlora_lab.experiments.study. See docs/study.md.
"""

from __future__ import annotations

import argparse
import json
import os

from . import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "study",
        help="paired experiment from a spec: lr chosen per method on validation, then "
        "many seeds; verdicts per claim (study.json, verdicts.md, PNGs)",
        description="Run the grid a YAML spec describes (tasks x methods x learning rates x "
        "seeds), choose each method's lr per task on the validation split, run the "
        "final seeds at it, and write DIR/study.json with paired 95%% intervals and "
        "verdicts (better/worse/equivalent/inconclusive), DIR/verdicts.md and PNGs. "
        "Every run is its own file under DIR/runs/; --resume skips finished runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("spec", help="the study spec (YAML; see docs/study.md and studies/*.yaml)")
    a("--out", required=True, help="output folder")
    a("--jobs", type=int, default=1, help="worker processes (default 1)")
    a(
        "--threads",
        type=int,
        help="torch threads per job (default: $OMP_NUM_THREADS if set, "
        "else max(1, cpus // jobs); 1 is best on a busy machine)",
    )
    a(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where runs train (default cpu); with cuda and several GPUs, one job per GPU",
    )
    a(
        "--resume",
        action="store_true",
        help="continue the study in --out: skip every finished run (the spec must be the same)",
    )
    a(
        "--reuse",
        action="append",
        default=[],
        metavar="DIR",
        help="before running, copy the finished runs of the study in DIR that this spec would run "
        "identically (same task settings, method and fields, lr, steps, seed); repeatable",
    )
    a(
        "--report",
        action="store_true",
        help="run nothing: write verdicts.md and the plots of what --out holds so far (a study "
        "stopped part-way has verdicts for its finished tasks); the spec must be the same",
    )
    a(
        "--tasks",
        metavar="NAMES",
        help="run only these of the spec's tasks (comma-separated; the spec and --resume are "
        "unchanged, and verdicts.md covers every task with runs)",
    )
    a(
        "--methods",
        metavar="NAMES",
        help="run only these of the spec's methods (comma-separated, as named in the spec; "
        "the other sides of their pairs come from --reuse or a later --resume)",
    )
    a("--no-progress", action="store_true", help="no progress bar (--jobs 1)")
    p.set_defaults(func=run)


def _subset(flag: str, value, names: list[str], what: str):
    """The set of names a comma-separated flag picks among ``names`` (None when not given)."""
    if value is None:
        return None
    picked = {x.strip() for x in value.split(",") if x.strip()}
    unknown = sorted(picked - set(names))
    if unknown or not picked:
        raise UsageError(
            f"{flag}: {', '.join(unknown) or f'no {what} named'}: not a {what} of "
            f"the spec (its {what}s: {', '.join(names)})"
        )
    return picked


def _env_threads():
    v = os.environ.get("OMP_NUM_THREADS", "")
    return int(v) if v.isdigit() and int(v) >= 1 else None


def _read_json(path: str, way_out: str) -> dict:
    """A study's own JSON file (spec.json, study.json); UsageError naming it when damaged."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
        why = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
        raise UsageError(f"{path}: damaged or unreadable ({why}); {way_out}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: damaged (not a JSON object); {way_out}")
    return data


def _check_out(out: str, spec: dict, resume: bool) -> None:
    from ..experiments import study_spec

    spec_path = os.path.join(out, "spec.json")
    if os.path.exists(spec_path):
        if not resume:
            raise UsageError(
                f"--out {out!r} already holds a study; pass --resume to continue "
                "it or choose another folder"
            )
        old = _read_json(spec_path, "restore it, or start a new --out")
        d = study_spec.run_diff(old, spec)
        if d:
            more = f" and {len(d) - 5} more" if len(d) > 5 else ""
            raise UsageError(
                f"--resume: {out!r} was made with another spec; it differs at "
                f"{', '.join(d[:5])}{more}"
            )
        changed = [k for k in study_spec.ANALYSIS_KEYS if old.get(k) != spec.get(k)]
        if changed:  # how runs are compared, not what they are: recomputed from the run files
            print(
                f"note: the spec's {' and '.join(changed)} changed since {out!r} was made; "
                "the verdicts use the new ones",
                flush=True,
            )
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r}: not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    probe_dir = out if os.path.isdir(out) else parent
    while not os.path.isdir(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    if not os.access(probe_dir, os.W_OK):
        raise UsageError(f"--out {out!r}: not writable")


def run(args) -> int:
    from ..experiments import study_spec

    try:
        spec = study_spec.load(args.spec)
    except study_spec.SpecError as e:
        raise UsageError(str(e)) from None
    if args.jobs < 1:
        raise UsageError(f"--jobs: must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: must be >= 1, got {args.threads}")
    gpus = 0
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            raise UsageError("--device cuda: no CUDA GPU is visible")
    threads = args.threads or _env_threads() or max(1, (os.cpu_count() or 1) // args.jobs)
    only = _subset("--tasks", args.tasks, [t["name"] for t in spec["tasks"]], "task")
    only_methods = _subset(
        "--methods", args.methods, [m["name"] for m in spec["methods"]], "method"
    )
    from ..experiments.fingerprint import machine_fingerprint
    from ..experiments.records import RecordError, StudyLock

    if args.report and not os.path.isfile(os.path.join(args.out, "study.json")):
        raise UsageError(f"--report: {args.out!r} holds no study (no study.json)")
    _check_out(args.out, spec, resume=args.resume or args.report)
    lock = StudyLock(args.out)

    def take_lock():  # before the first write: one process per study folder
        lock.acquire()  # the kernel frees it when this process ends, however it ends
        _check_out(args.out, spec, resume=args.resume or args.report)  # still true under it

    try:
        return _run(args, spec, only, only_methods, threads, gpus, machine_fingerprint, take_lock)
    except RecordError as e:
        raise UsageError(str(e)) from None
    finally:
        lock.release()


def _run(args, spec, only, only_methods, threads, gpus, machine_fingerprint, take_lock) -> int:
    from ..experiments import compare, study, study_jobs

    if args.report:
        take_lock()
        saved = _read_json(
            os.path.join(args.out, "study.json"), "run --resume on this folder to write it again"
        )
        # recomputed from the run files with this code (a study.json written by older code
        # lacks what newer reports show); meta, status and wall time are the study's
        st = study.Study(spec, args.out)
        st.load_done()
        summary = st.summary(
            saved.get("meta", {}),
            saved.get("status", "unknown"),
            __import__("time").time() - saved.get("wall_time_s", 0.0),
        )
        rc = _write_report(summary, args.out)
        study_jobs.write_json(os.path.join(args.out, "study.json"), summary)
        study_jobs.write_json(os.path.join(args.out, "spec.json"), spec)  # its pairs/margins
        return rc
    device = "cuda" if gpus else "cpu"
    fp = machine_fingerprint(threads=threads, device=device)
    if args.resume:
        take_lock()
        other = study.other_machine_runs(args.out, fp["id"])
        if other:
            raise UsageError(
                f"--resume: {len(other)} finished run(s) in {args.out!r} were made on another "
                f"machine or before machine fingerprints (e.g. {other[0]}"
                f"{_fingerprint_diff(os.path.join(args.out, other[0]), fp)}); a study pairs only "
                f"runs of one machine (this one is {fp['id']}: {fp['cpu']}, "
                f"{fp['cpu_capability']}, {threads} thread(s)). Resume on that machine, or start "
                f"a new --out here (add --reuse {args.out} to copy what this machine made)"
            )
    for d in args.reuse:
        if not os.path.isfile(os.path.join(d, "spec.json")):
            raise UsageError(f"--reuse {d!r}: not a study folder (no spec.json)")
        _read_json(os.path.join(d, "spec.json"), f"restore it, or drop --reuse {d}")
    import torch

    torch.set_num_threads(threads)
    task_meta = {}
    try:  # every task's data, model and adapters, before anything is written
        for t in spec["tasks"]:
            if only is not None and t["name"] not in only:
                continue
            task_meta[t["name"]] = study_jobs.prepare(t, device)[3]
            study_jobs.check_adapters(
                t,
                [m for m in spec["methods"] if only_methods is None or m["name"] in only_methods],
                device,
            )
    except study_jobs.TaskError as e:
        raise UsageError(str(e)) from None
    if args.jobs > 1:
        study_jobs.forget()  # the workers load their own
    if not args.resume:
        take_lock()
    study_jobs.write_json(os.path.join(args.out, "spec.json"), spec)
    reused = {}
    for d in args.reuse:
        reused[d] = study.reuse_runs(spec, args.out, d, fingerprint=fp["id"])
        skipped = {
            k: n
            for k, n in reused[d]["skipped"].items()
            if k in ("made on another machine", "no machine fingerprint", "damaged")
        }
        print(
            f"--reuse {d}: {reused[d]['copied']} run(s) copied"
            + "".join(f"; {n} not copied ({k}: they run here)" for k, n in skipped.items()),
            flush=True,
        )
    meta = {
        "versions": compare.versions(),
        "hardware": compare.hardware(),
        "fingerprint": fp,
        "git_commit": compare.git_commit(),
        "jobs": args.jobs,
        "threads_per_job": threads,
        "device": device,
        "tasks": task_meta,
        "reused": reused,
        "started": __import__("time").strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    n_sel = sum(len(t["lrs"][m["name"]]) for t in spec["tasks"] for m in spec["methods"]) * len(
        spec["selection"]["seeds"]
    )
    n_fin = len(spec["tasks"]) * len(spec["methods"]) * len(spec["final"]["seeds"])
    total = study.Study(spec, args.out, only, only_methods).pending_total()
    print(
        f"srlora study {spec['name']}: {len(spec['tasks'])} task(s) x {len(spec['methods'])} "
        f"method(s); {n_sel} selection + {n_fin} final runs, {total} distinct; {args.jobs} "
        f"job(s) x {threads} thread(s) on {device}; results in {args.out}"
        + (f"; this session runs only {', '.join(sorted(only))}" if only else "")
        + (f"; methods only {', '.join(sorted(only_methods))}" if only_methods else ""),
        flush=True,
    )
    if spec["smoke"]:
        print("smoke spec: fewer seeds/lrs than a verdict needs (a check of the machinery)")
    summary = study.run_study(
        spec,
        args.out,
        meta,
        jobs=args.jobs,
        threads=threads,
        device=device,
        gpus=gpus if args.jobs > 1 else 0,
        log=lambda s: print(s, flush=True),
        progress=not args.no_progress,
        only=only,
        only_methods=only_methods,
    )
    return _write_report(summary, args.out)


def _fingerprint_diff(path: str, fp: dict) -> str:
    """How the fingerprint of the record at ``path`` differs from ``fp`` (this run's), as a
    clause: a thread count alone differs with another --threads on this same machine."""
    from ..experiments.records import RecordError, read_record

    try:
        theirs = read_record(path).get("fingerprint")
    except RecordError:
        return ""
    if not isinstance(theirs, dict):
        return ", which has no fingerprint"
    keys = sorted(k for k in set(theirs) | set(fp) if k != "id" and theirs.get(k) != fp.get(k))
    text = ", whose fingerprint differs in " + ", ".join(
        f"{k} ({theirs.get(k)!r} there, {fp.get(k)!r} here)" for k in keys
    )
    if keys == ["threads"]:
        text += f": pass --threads {theirs['threads']} to resume it"
    return text


def _write_report(summary: dict, out: str) -> int:
    """verdicts.md, the console table and the plots of ``summary`` (study.json's content)."""
    from ..experiments import study_plots, study_report

    md = study_report.format_markdown(summary)
    with open(os.path.join(out, "verdicts.md"), "w") as f:
        f.write(md + "\n")
    print(study_report.format_console(summary))
    for p in study_plots.write_all(summary, out):
        print(f"wrote {p}")
    print(
        f"wrote {os.path.join(out, 'verdicts.md')} (study {summary.get('status')}, "
        f"{summary.get('wall_time_s', 0) / 60:.1f} min; its runs in {os.path.join(out, 'runs')})"
    )
    return 0
