"""Per-step time of the Flower app (1 user) against the in-process loop, timed the same way (issue #24).

    python benchmarks/bench_steps.py --configs 64x16 16x128     # on a quiet machine; writes results_steps_<host>.json
    python benchmarks/bench_steps.py --configs 4x16 --k 2 --k2 4 --warmup 1 --repeats 1 --out -   # smoke test, prints

What is measured, per config WIDTHxBATCH (U-Net width, batch size; 1 user on all cores, ψ an untrained ResNet-20):

* in-process, steady: inside the loop of ``pp_flower.reference.train_in_process`` (its own subprocess), the mean
  time per step after ``--warmup`` steps, from a timestamp taken as each ``reference_step`` returns.
* in-process, whole run, and Flower, whole run: the wall time of the command (the reference's subprocess;
  ``python -m runtime.flower_simulation``) from outside, with k and k' steps: (T(k') − T(k)) / (k' − k), each T the
  best of ``--repeats`` runs. What a run does once (imports, Ray, data, φ, validation, test) cancels.
* the app's own split, from run.json of its k' runs (training rounds after the warm-up, mean): round, user compute
  (the user's reported compute seconds), provider compute (ψ), messaging = round − user − provider; waiting (the
  provider's wait for replies, all rounds); between rounds = Flower's whole-run per-step − round.

How, so that no run can fool the benchmark:

* every run gets a run dir that did not exist before it; after it, run.json (the app) or the timing file (the
  reference) must show exactly the steps asked for — a run that resumed and trained nothing fails the benchmark;
* a run starts only once no process of the run before it remains: its process tree (seen while it ran), the Ray
  processes of its Ray session (``session_…_<driver pid>``) and anything naming its run dir, polled with psutil up to
  ``--settle-timeout`` seconds, else the benchmark fails; no fixed sleeps;
* order, per config: one untimed app run of k steps (file caches, Ray's first start), then ``--repeats`` cycles of
  [lone reference k', app k, reference k, app k', reference k'] and one last lone reference k'. Each reference
  "beside" the app starts right after an app run (where the old ``bench_scale.py steps`` was fooled); each cycle is
  bracketed by two lone references (after a reference, not after the app);
* the ratio is formed inside each cycle (the in-process steady s/step of its two references ÷ the app's whole-run
  s/step), and the median over cycles is reported: this 2-core VM's speed drifts by itself by up to 30 % over
  ten minutes (measured with nothing else running), so numbers minutes apart are not compared;
* a machine where other processes use CPU at the start (> 10 % of a core in all) is refused (exit 3): torch with
  as many threads as cores slows down many-fold beside any other load (2 cores: 0.4 s/step on 1 thread, 6-7 s/step
  on 2, measured beside another run);
* check, per cycle: its two bracketing lone references must agree within 2 × ``--min-tolerance`` (else the machine
  drifted too fast to measure), and the references beside the app must lie within ``--min-tolerance`` of the range
  the two lone runs span; otherwise the benchmark exits 3 with one line and writes nothing (the machine was busy, or
  the runs disturb each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PPFLOWER_QUIET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from experiments.reproduce.report import portable  # noqa: E402
from runtime.signals import die_with_parent  # noqa: E402

RAY_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_(\d+)")  # ends in the Ray driver's pid
REFUSED = 3  # exit status when the check fails


# ------------------------------------------------------------------------- the pure logic (tests/test_benchmarks.py)


def per_step_from_walls(walls_k: list[float], walls_k2: list[float], k: int, k2: int) -> float:
    """(T(k') − T(k)) / (k' − k), each T the best (shortest) of its runs: what a run does once cancels."""
    if not (0 < k < k2) or not walls_k or not walls_k2:
        raise ValueError(f"need 0 < k < k' and runs of both lengths, got k={k}, k'={k2}")
    return (min(walls_k2) - min(walls_k)) / (k2 - k)


def steady_per_step(stamps: list[float], warmup: int) -> float:
    """Mean seconds per step after ``warmup`` steps, from the times at which each step ended."""
    if not 1 <= warmup < len(stamps):
        raise ValueError(f"need 1 ≤ warmup < steps, got warmup={warmup} with {len(stamps)} steps")
    return (stamps[-1] - stamps[warmup - 1]) / (len(stamps) - warmup)


def check_cycle(lone_before: float, lone_after: float, beside_app: list[float], tol: float) -> str:
    """'' when a cycle can be trusted, else why not, in one line: its two bracketing lone references (steady s/step)
    agree within 2 × ``tol``, and the references run right after the app lie within ``tol`` of the range they span."""
    low, high = min(lone_before, lone_after), max(lone_before, lone_after)
    if high > low * (1 + 2 * tol):
        return (f"the lone in-process reference went from {lone_before:.4f} to {lone_after:.4f} s/step within one "
                f"cycle ({lone_after / lone_before - 1:+.0%}, allowed ±{2 * tol:.0%}): the machine drifted too fast to "
                "measure")
    for value in beside_app:
        if not low * (1 - tol) <= value <= high * (1 + tol):
            return (f"the in-process reference took {value:.4f} s/step right after the app but {lone_before:.4f} and "
                    f"{lone_after:.4f} s/step alone around it (tolerance ±{tol:.0%}): the machine is not quiet or the "
                    "runs disturb each other")
    return ""


def app_split(run: dict, warmup: int) -> dict:
    """The app's own per-round seconds (run.json): means over the training rounds after ``warmup``, and its steady
    s/step from the rounds' end stamps (as :func:`steady_per_step` for the reference)."""
    trained = [r for r in run["rounds"] if r["images"]]
    rounds = trained[warmup:]
    mean = {key: statistics.mean(r[key] for r in rounds) for key in ("seconds", "user-compute", "provider-compute")}
    timing = run["timing"]
    return {"round": mean["seconds"], "user": mean["user-compute"], "provider": mean["provider-compute"],
            "messaging": mean["seconds"] - mean["user-compute"] - mean["provider-compute"],
            "waiting": timing["wait"] / max(timing["steps"], 1),
            "steady": steady_per_step([r["ended"] for r in trained], warmup)}


COLUMNS = [("config", "{}"), ("in-process steady", "{:.3f}"), ("in-process whole-run", "{:.3f}"),
           ("Flower whole-run", "{:.3f}"), ("Flower steady", "{:.3f}"), ("speed Flower÷in-process", "{:.2f}"),
           ("per cycle", "{}"), ("round", "{:.3f}"),
           ("user", "{:.3f}"), ("provider", "{:.3f}"), ("messaging", "{:.3f}"), ("waiting", "{:.3f}"),
           ("between rounds", "{:.3f}")]


def table(rows: list[dict]) -> str:
    """Markdown table of the rows (seconds per step; the app's split per round)."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    kind: str                 # "app" or "reference"
    steps: int
    run_dir: Path | None      # None: a run without one (bench_scale.py's)
    cmd: list[str]
    wall: float = 0.0
    pid: int = 0
    seen: list = field(default_factory=list)  # psutil.Process objects of its tree, seen while it ran
    steady: float | None = None               # reference: s/step inside the loop after the warm-up
    split: dict | None = None                 # app: its own per-round split


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # is_running also checks the pid was not reused
    except psutil.Error:
        return False


def leftovers(prev: Run | None) -> list[psutil.Process]:
    """Live processes of the run before: this process's children, the tree it had, its Ray session, its run dir."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    if prev is not None:
        found.update({p.pid: p for p in prev.seen})
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info["cmdline"] or ())
            session = RAY_SESSION.search(line)
            if (prev.run_dir and str(prev.run_dir) in line) or (session and int(session.group(1)) == prev.pid):
                found[p.pid] = p
    found.pop(os.getpid(), None)
    return [p for p in found.values() if alive(p)]


def wait_until_gone(prev: Run | None, timeout: float) -> tuple[float, str]:
    """Block until :func:`leftovers` is empty: (seconds waited, what was waited for); fail loudly after ``timeout``."""
    start, names = time.monotonic(), ""
    while left := leftovers(prev):
        names = names or ", ".join(sorted({name(p) for p in left}))
        remaining = timeout - (time.monotonic() - start)
        if remaining <= 0:
            raise SystemExit(f"bench_steps: {len(left)} process(es) of the previous run still alive after "
                             f"{timeout:g} s: " + "; ".join(f"{p.pid} {name(p)}" for p in left[:5]))
        psutil.wait_procs(left, timeout=min(1.0, remaining))
    return time.monotonic() - start, names


def name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip()[:40] or p.name()
    except psutil.Error:
        return "?"


def execute(run: Run) -> Run:
    """Run the command; its wall time from outside, and every process of its tree seen (each second) meanwhile."""
    assert not run.run_dir.exists(), f"run dir {run.run_dir} exists: a rerun would resume and train nothing"
    seen: dict[int, psutil.Process] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(run.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)  # a run never outlives the benchmark that started it
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            try:
                seen.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    run.wall = time.perf_counter() - started
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench_steps: {shlex.join(run.cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    run.pid, run.seen = proc.pid, list(seen.values())
    return run


def app_run(args, base: Path, width: int, batch: int, steps: int, n: int) -> Run:
    cores = os.cpu_count() or 1
    rc = {"limit-train": steps * batch, "limit-eval": 8, "eval-chunk": 8, "batch-size": batch, "unet-base": width,
          "epochs": 1, "augment": True, "num-threads": args.threads, "classifier": args.classifier,
          "run-dir": str(base / f"{n:02d}-app-w{width}-b{batch}-k{steps}"), "step-timeout": 600.0}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in rc.items())
    cmd = [sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "1", "--num-cpus", str(cores),
           "--run-config", text]
    run = execute(Run("app", steps, Path(rc["run-dir"]), cmd))
    summary = json.loads((run.run_dir / "run.json").read_text())
    applied = [u["steps-applied"] for u in summary["users"]]
    images = sum(r["images"] for r in summary["rounds"])
    if applied != [steps] or images != steps * batch:
        raise SystemExit(f"bench_steps: the app run in {run.run_dir} applied {applied} steps on {images} images, "
                         f"asked for {steps} steps of {batch}: it did not train what it was timed for")
    run.split = app_split(summary, args.warmup) if steps > args.warmup else None
    return run


def reference_run(args, base: Path, width: int, batch: int, steps: int, n: int) -> Run:
    run_dir = base / f"{n:02d}-ref-w{width}-b{batch}-k{steps}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference", str(run_dir), "--configs",
           f"{width}x{batch}", "--k", str(steps), "--threads", str(args.threads), "--classifier", args.classifier]
    run = execute(Run("reference", steps, run_dir, cmd))
    stamps = json.loads((run_dir / "timing.json").read_text())["stamps"]
    if len(stamps) != steps:
        raise SystemExit(f"bench_steps: the reference in {run_dir} ran {len(stamps)} steps, asked for {steps}")
    run.steady = steady_per_step(stamps, args.warmup) if steps > args.warmup else None
    return run


def reference_main(args) -> None:
    """The in-process loop for ``--k`` steps, a timestamp as each step returns (→ RUN_DIR/timing.json)."""
    import torch

    import pp_flower.reference as reference
    from pp_flower.checkpoints import load_classifier
    from pp_flower.config import AppConfig
    from pp_flower.data import load_splits
    from pp_flower.features import load_feature_net

    width, batch = map(int, args.configs[0].split("x"))
    torch.set_num_threads(args.threads)  # as the app's user (its num-threads)
    cfg = AppConfig(batch_size=batch, unet_base=width, classifier=args.classifier, augment=True)
    splits = load_splits(None, limit_train=args.k * batch)
    classifier, _ = load_classifier(args.classifier)
    stamps, step = [], reference.reference_step

    def timed_step(*a, **kw):
        out = step(*a, **kw)  # returns Python floats: the step's work is done (CPU) or synchronised (CUDA)
        stamps.append(time.perf_counter())
        return out

    reference.reference_step = timed_step
    reference.train_in_process(cfg, classifier, load_feature_net(None), splits.train_all.images,
                               splits.train_all.labels, splits.train_ids, max_steps=args.k, steps_per_epoch=args.k)
    run_dir = Path(args.reference)
    run_dir.mkdir(parents=True)  # fails if it exists
    (run_dir / "timing.json").write_text(json.dumps({"steps": len(stamps), "stamps": stamps}))


def shown(cmd: list[str], base: Path | None = None) -> str:
    """A command as the results file records it: ``python`` for this interpreter, paths relative to the repo, the
    benchmark's temporary directory as ``$BENCH`` (no path of the machine that ran it)."""
    text = portable(shlex.join(["python", *cmd[1:]] if cmd and cmd[0] == sys.executable else cmd))
    return text.replace(str(base), "$BENCH") if base is not None else text


# ------------------------------------------------------------------------------------------------------ the loop


def foreign_load(threshold: float = 10.0) -> str:
    """'' on a quiet machine, else the processes that use CPU now (% of one core), when they total > ``threshold``."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)  # one measurement window for cpu_percent, not a wait for anything
    busy = []
    for p in procs:
        try:
            if (cpu := p.cpu_percent(None)) > 1:
                busy.append((cpu, " ".join(p.info["cmdline"] or ()).strip()[:60]))
        except psutil.Error:
            pass
    total = sum(cpu for cpu, _ in busy)
    return f"{total:.0f} % of a core: " + "; ".join(f"{c:.0f} % {name}" for c, name in sorted(busy)[::-1][:4]) \
        if total > threshold else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["64x16", "16x128"], help="WIDTHxBATCH, e.g. 64x16 16x128")
    ap.add_argument("--k", type=int, default=4, help="steps of the short runs")
    ap.add_argument("--k2", type=int, default=24, help="steps of the long runs (k')")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the steady and in-app means")
    ap.add_argument("--repeats", type=int, default=3, help="cycles (each: a lone reference, then app and reference "
                    "runs of k and k' steps)")
    ap.add_argument("--min-tolerance", type=float, default=0.10,
                    help="how far a reference beside the app may lie outside its cycle's lone references")
    ap.add_argument("--settle-timeout", type=float, default=180.0,
                    help="seconds a run's processes may take to go away before the next run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the reference and of the app's user (num-threads); default: all cores")
    ap.add_argument("--allow-busy", action="store_true",
                    help="run even when other processes use CPU at the start (smoke tests only: timings invalid)")
    ap.add_argument("--classifier", default="", help="ψ checkpoint (default: an untrained ResNet-20)")
    ap.add_argument("--out", default=f"benchmarks/results_steps_{platform.node() or 'host'}.json",
                    help="results JSON ('-': print only)")
    ap.add_argument("--reference", default="", help=argparse.SUPPRESS)  # internal: one in-process run into RUN_DIR
    args = ap.parse_args()
    if args.reference:
        return reference_main(args)
    if not 1 <= args.warmup < args.k < args.k2:
        ap.error("need 1 ≤ --warmup < --k < --k2")

    import torch

    from pp_flower.checkpoints import classifier_blob, save_atomic
    from pp_flower.models import ResNet20

    base = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    if not args.classifier:
        args.classifier = str(base / "psi.pt")  # speed does not depend on ψ's weights
        save_atomic(classifier_blob(ResNet20(), "resnet20", 10), args.classifier)
    busy = foreign_load()
    if busy and not args.allow_busy:
        shutil.rmtree(base, ignore_errors=True)
        print(f"bench_steps refused: the machine is not quiet ({busy})", file=sys.stderr)
        raise SystemExit(REFUSED)
    if busy:
        print(f"warning: the machine is not quiet, no timing below is valid: {busy}", flush=True)
    result = {"what": __doc__, "command": shown([sys.executable, *sys.argv]),
              "k": args.k, "k2": args.k2, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}", "busy_at_start": busy, "rows": [], "runs": []}
    prev: Run | None = None
    for config in args.configs:
        width, batch = map(int, config.split("x"))
        cycle = [("lone", "reference", args.k2), ("beside", "app", args.k), ("beside", "reference", args.k),
                 ("beside", "app", args.k2), ("beside", "reference", args.k2)]
        plan = [(0, "prime", "app", args.k)] + [(c, *step) for c in range(1, args.repeats + 1) for step in cycle] + [
            (args.repeats + 1, "lone", "reference", args.k2)]
        runs: list[tuple[int, str, Run]] = []
        for number, role, kind, steps in plan:
            waited, what = wait_until_gone(prev, args.settle_timeout)
            if prev is not None:
                shutil.rmtree(prev.run_dir, ignore_errors=True)  # its processes are gone; free the disk
            prev = (app_run if kind == "app" else reference_run)(args, base, width, batch, steps, len(result["runs"]))
            runs.append((number, role, prev))
            result["runs"].append({"config": config, "cycle": number, "role": role, "kind": kind, "steps": steps,
                                   "wall": prev.wall, "waited_before": waited, "waited_for": what,
                                   "steady": prev.steady, "split": prev.split, "command": shown(prev.cmd, base)})
            print(f"{config} cycle {number} {role:6} {kind:9} k={steps:3d}: wall {prev.wall:7.2f} s"
                  + (f", steady {prev.steady:.4f} s/step" if prev.steady is not None else "")
                  + (f" (started {waited:.1f} s after the run before, once gone: {what})" if what else ""), flush=True)
        lone = {number: run.steady for number, role, run in runs if role == "lone"}
        cycles = []
        for c in range(1, args.repeats + 1):
            mine = [run for number, role, run in runs if number == c and role == "beside"]
            refs = [r for r in mine if r.kind == "reference"]
            apps = [r for r in mine if r.kind == "app"]
            problem = check_cycle(lone[c], lone[c + 1], [r.steady for r in refs], args.min_tolerance)
            if problem:
                wait_until_gone(prev, args.settle_timeout)
                shutil.rmtree(base, ignore_errors=True)
                print(f"bench_steps refused ({config}, cycle {c}): {problem}", file=sys.stderr)
                raise SystemExit(REFUSED)
            app_long = next(r for r in apps if r.steps == args.k2)
            cycles.append({"in-process steady": statistics.mean(r.steady for r in refs),
                           "in-process whole-run": per_step_from_walls([refs[0].wall], [refs[1].wall], args.k, args.k2),
                           "Flower whole-run": per_step_from_walls([apps[0].wall], [apps[1].wall], args.k, args.k2),
                           **app_long.split})
            cycles[-1]["speed"] = cycles[-1]["in-process steady"] / cycles[-1]["Flower whole-run"]

        def median(key: str) -> float:
            return statistics.median(c[key] for c in cycles)

        row = {"config": config, "in-process steady": median("in-process steady"),
               "in-process whole-run": median("in-process whole-run"), "Flower whole-run": median("Flower whole-run"),
               "Flower steady": median("steady"), "speed Flower÷in-process": median("speed"),
               "per cycle": " ".join(f"{c['speed']:.2f}" for c in cycles),
               **{key: median(key) for key in ("round", "user", "provider", "messaging", "waiting")},
               "lone in-process steady": [lone[c] for c in sorted(lone)], "cycles": cycles}
        row["between rounds"] = row["Flower whole-run"] - row["round"]
        result["rows"].append(row)
    wait_until_gone(prev, args.settle_timeout)
    shutil.rmtree(base, ignore_errors=True)
    print(f"\nseconds per step (1 user, {args.threads} torch threads on {os.cpu_count()} cores); the app's split "
          "is its own per-round timing (run.json)\n")
    print(table(result["rows"]))
    print(f"\nreproduce: {result['command']}")
    for kind in ("app", "reference"):
        example = next(r["command"] for r in result["runs"] if r["kind"] == kind)
        print(f"  e.g. one {kind} run ($BENCH: the benchmark's temporary directory): {example}")
    if args.out != "-":
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
