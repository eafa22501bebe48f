"""Round trip per training step: deployment (SuperLink + SuperNodes as processes, TLS + auth) vs simulation.

    python benchmarks/bench_deployment.py --steps 8 --users 2 --out benchmarks/results_deployment_cpu2.json

Same app, same run config, same machine. A round = the provider sends every user its gradient and the request
for the next batch, and collects the protected batches. Reported per mode: median round seconds (steady state,
first two rounds excluded), user compute on the critical path, provider compute, and the rest (messaging:
process start-up per message in deployment, polling, serialisation). ``--modes`` picks the rows:

* ``sim``: ``flower-simulation`` (Ray), users live in trainer actors;
* ``trainer``: ``ppflower-supernode`` with the user's long-lived trainer beside each SuperNode (the default);
  its per-message phases (``PPFLOWER_WARM_PROFILE=1``) are written to ``--phases-out``; with ``--trace`` its
  round is split into the legs of the critical user's path, from a timeline that every process of the deployment
  writes (benchmarks/round_trace/sitecustomize.py);
* ``context``: ``ppflower-supernode`` with ``PPFLOWER_USER_TRAINER=0``: state in ``context.state`` per message;
* ``plain``: Flower's own ``flower-supernode`` (also state in ``context.state``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PPFLOWER_QUIET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

WARMUP = 2


def summarise(run: dict, mode: str, wall: float) -> dict:
    """Medians over the steady-state training rounds of the round time and its parts (per round, not averaged)."""
    rounds = [r for r in run["rounds"] if r["images"] > 0][WARMUP:]
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    messaging = statistics.median(r["seconds"] - r["user-compute"] - r["provider-compute"] for r in rounds)
    return {"mode": mode, "median_round_seconds": med("seconds"), "rounds_measured": len(rounds),
            "user_compute_critical_per_round": med("user-compute"),
            "provider_compute_per_round": med("provider-compute"),
            "messaging_per_round": messaging, "wall_seconds_whole_run": wall}


LEGS = ("message reaches the node", "ClientApp process starts", "ClientApp pulls the message",
        "app loads, relays to the trainer", "user compute (trainer)", "reply to the node", "node pushes to SuperLink",
        "provider pulls the reply", "psi and bookkeeping")


def round_legs(trace: Path, train_rounds: int) -> dict:
    """Median seconds of each leg of a steady training round along the critical user's path (the user whose reply
    the provider got last), from the timeline in ``trace``; the legs add up to the round (push to next push)."""
    events = sorted((float(t), node, ev) for t, node, ev in (line.split() for line in trace.read_text().splitlines()
                                                              if len(line.split()) == 3))
    pushes = [t for t, _, ev in events if ev == "provider.push+"]
    nodes = sorted({node for _, node, _ in events if node != "-"})
    rounds = []
    for start, end in zip(pushes, pushes[1:]):
        window = [(t, node, ev) for t, node, ev in events if start <= t < end]
        marks = {}
        for node in nodes:
            mine = [(t, ev) for t, n, ev in window if n == node]

            def first(event, after):
                return next((t for t, ev in mine if ev == event and t >= after), None)

            m = {"arrive": first("node.pull-", start)}
            for key, event in (("main", "clientapp.main+"), ("pulled", "clientapp.pull-"), ("call", "trainer.call+"),
                               ("called", "trainer.call-"), ("pushed", "clientapp.push-"), ("sent", "node.push-")):
                previous = list(m.values())[-1]
                m[key] = None if previous is None else first(event, previous)
            if m["sent"] is not None:
                m["got"] = next((t for t, n, ev in window if ev == "provider.pull-" and t >= m["sent"]), None)
            if None in m.values() or "got" not in m:
                break
            marks[node] = m
        if len(marks) == len(nodes):
            rounds.append((start, end, marks))
    steady = rounds[:train_rounds][WARMUP:]
    if not steady:
        raise SystemExit(f"{trace}: no complete training round in the timeline")
    per_leg: dict[str, list[float]] = {leg: [] for leg in LEGS}
    for start, end, marks in steady:
        m = max(marks.values(), key=lambda m: m["got"])
        last_pull = max(mk["got"] for mk in marks.values())
        for leg, a, b in zip(LEGS, [start, m["arrive"], m["main"], m["pulled"], m["call"], m["called"], m["pushed"],
                                    m["sent"], last_pull], [m["arrive"], m["main"], m["pulled"], m["call"], m["called"],
                                                            m["pushed"], m["sent"], m["got"], end]):
            per_leg[leg].append(b - a)
    return {"rounds": len(steady), "legs_median_seconds": {k: statistics.median(v) for k, v in per_leg.items()},
            "round_median_seconds": statistics.median(end - start for start, end, _ in steady),
            **request_costs(trace, [(start, end) for start, end, _ in steady])}


def request_costs(trace: Path, windows: list[tuple[float, float]]) -> dict:
    """Flower's HTTP requests in the ``windows`` (steady rounds): how many per round of each kind, how long each
    took as its client saw it, and how long the SuperLink's handler of that kind took (median seconds)."""
    inside = lambda t: any(a <= t < b for a, b in windows)  # noqa: E731
    seen: dict[tuple[str, str], list[float]] = {}
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] in ("request", "handler") and inside(float(parts[0])):
            seen.setdefault((parts[2], parts[3]), []).append(float(parts[4]))
    per_round = lambda n: n / max(len(windows), 1)  # noqa: E731
    return {"requests_per_round": {k: per_round(len(v)) for (kind, k), v in sorted(seen.items()) if kind == "request"},
            "request_median_seconds": {k: statistics.median(v) for (kind, k), v in sorted(seen.items())
                                       if kind == "request"},
            "superlink_handler_median_seconds": {k: statistics.median(v) for (kind, k), v in sorted(seen.items())
                                                 if kind == "handler"}}


def run_config(args, classifier: str, run_dir: Path) -> dict:
    return {"classifier": classifier, "run-dir": str(run_dir), "epochs": 1, "batch-size": args.batch_size,
            "unet-base": args.unet_base, "limit-train": args.users * args.batch_size * args.steps,
            "limit-eval": 100, "eval-chunk": 100, "num-threads": max(1, (os.cpu_count() or 2) // args.users),
            "min-users": args.users}


def bench_simulation(args, classifier: str) -> dict:
    from pp_flower.config import AppConfig
    from runtime.flower_simulation import simulate
    from sims.main import client_app, server_app, start_trainers

    run_dir = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    cfg = AppConfig.from_run_config(run_config(args, classifier, run_dir))
    t0 = time.perf_counter()
    simulate(server_app, client_app, args.users, cfg.to_run_config(), num_cpus=1.0, start_trainers=start_trainers)
    return summarise(json.loads((run_dir / "run.json").read_text()), "simulation (flower-simulation)",
                     time.perf_counter() - t0)


def bench_deployment(args, classifier: str, mode: str) -> dict:
    from runtime.deploy_local import LocalDeployment

    fast = mode != "plain"
    os.environ["PPFLOWER_USER_TRAINER"] = "1" if mode == "trainer" else "0"  # read by ppflower-supernode
    os.environ["PPFLOWER_WARM_PROFILE"] = "1" if mode == "trainer" and args.phases_out else "0"
    work = Path(tempfile.mkdtemp(prefix="bench-dep-"))
    run_dir = work / "provider"
    trace = work / "trace.txt" if args.trace and mode == "trainer" else None
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PPF_TRACE")}
    if trace:  # read by the deployment's processes (LocalDeployment copies this environment), not by this one
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "round_trace"),
                                                                 saved["PYTHONPATH"]]))
        os.environ["PPF_TRACE"] = str(trace)
    t0 = time.perf_counter()
    with LocalDeployment(work, users=args.users, secure=True, fast_supernode=fast) as dep:
        rc = dep.run_app(run_config(args, classifier, run_dir), timeout=1800)
        node_log = dep.logtext("supernode-0")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if rc != 0:
        raise SystemExit(f"deployment run failed; see {work}")
    label = {"trainer": "ppflower-supernode, live user trainer",
             "context": "ppflower-supernode, state in context.state (PPFLOWER_USER_TRAINER=0)",
             "plain": "flower-supernode (state in context.state)"}[mode]
    result = summarise(json.loads((run_dir / "run.json").read_text()), f"deployment, TLS + auth, {label}",
                       time.perf_counter() - t0)
    if trace:
        result["trace"] = round_legs(trace, sum(1 for r in json.loads((run_dir / "run.json").read_text())["rounds"]
                                                if r["images"] > 0))
    if mode == "trainer" and args.phases_out:
        phases: dict[str, list[float]] = {}
        for line in node_log.splitlines():
            parts = line.split()
            if "ppflower-superexec:" in parts and len(parts) > parts.index("ppflower-superexec:") + 4:
                i = parts.index("ppflower-superexec:")
                if parts[i + 1] == "pid" and parts[i + 5] == "s":
                    phases.setdefault(parts[i + 3], []).append(float(parts[i + 4]))
        result["phases_median_seconds"] = {k: statistics.median(v) for k, v in phases.items()}
        result["phases_messages"] = {k: len(v) for k, v in phases.items()}
        phase_lines = [line for line in node_log.splitlines() if "ppflower-superexec: pid" in line]
        args.phases_out.write_text("\n".join(phase_lines))
    return result


def _portable(value) -> str:
    """An argument for the results file: paths relative to the repo, a file outside it by its name only."""
    text = str(value)
    if os.path.isabs(text):
        root = str(Path(__file__).resolve().parents[1])
        return os.path.relpath(text, root) if text.startswith(root + os.sep) else Path(text).name
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True, help="ψ checkpoint (speed does not depend on its weights)")
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps per user")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--unet-base", type=int, default=16)
    parser.add_argument("--modes", default="sim,trainer,context,plain", help="comma-separated: sim, trainer, "
                        "context, plain (see above)")
    parser.add_argument("--phases-out", type=Path, help="where the trainer row's per-message phase log goes")
    parser.add_argument("--trace", action="store_true", help="split the trainer row's round into legs (timeline "
                        "written by every process; adds a few ms per round)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import flwr
    import torch

    results = []
    for mode in args.modes.split(","):
        r = bench_simulation(args, args.classifier) if mode == "sim" else bench_deployment(args, args.classifier, mode)
        results.append(r)
        print(f"{r['mode']:<64} round {r['median_round_seconds']:.2f} s"
              f"  (user {r['user_compute_critical_per_round']:.2f}"
              f" + provider {r['provider_compute_per_round']:.2f} + messaging {r['messaging_per_round']:.2f})"
              f"  whole run {r['wall_seconds_whole_run']:.0f} s", flush=True)
        if "trace" in r:
            t = r["trace"]
            print("  critical path of a round (median s): " + ", ".join(
                f"{k} {v:.3f}" for k, v in t["legs_median_seconds"].items()), flush=True)
            print(f"  HTTP requests per round {sum(t['requests_per_round'].values()):.0f}: " + ", ".join(
                f"{k} {n:.1f} × {1000 * t['request_median_seconds'][k]:.1f} ms"
                for k, n in t["requests_per_round"].items()), flush=True)
            print("  SuperLink handlers (median ms): " + ", ".join(
                f"{k} {1000 * v:.2f}" for k, v in t["superlink_handler_median_seconds"].items()), flush=True)
        if "phases_median_seconds" in r:
            print("  per-message phases (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                  r["phases_median_seconds"].items()), flush=True)
    sim = next((r for r in results if r["mode"].startswith("simulation")), None)
    if sim:
        for r in results:
            r["ratio_to_simulation"] = r["median_round_seconds"] / sim["median_round_seconds"]
    if args.out:
        args.out.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
            "torch": torch.__version__, "flwr": flwr.__version__,
            "args": {k: _portable(v) for k, v in vars(args).items()},
            "results": results}, indent=2))


if __name__ == "__main__":
    main()
