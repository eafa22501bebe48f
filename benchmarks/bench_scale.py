"""Scale of the Flower app with live users, measured from outside the app (issue: paper scale on Flower).

    python benchmarks/bench_scale.py steps --out benchmarks/results_scale_cpu2.json
    python benchmarks/bench_scale.py users --users 8 16 32 64 --out benchmarks/results_users_cpu2.json

``steps``: per-step time of whole ``flower-simulation`` runs, = (wall(N2 steps) − wall(N1 steps)) / (N2 − N1),
best of two runs each, against the in-process reference loop timed the same way with the same cores
(``--num-cpus`` = cores ÷ users). Everything a run does once (Ray start-up, image cache, φ, validation, test)
cancels in the difference; everything it does per step — compute, messages, state handling — does not.
Also the app's own per-round timing: overhead = round − user compute − provider compute (median).

``users``: one run per user count with tiny shards and a small U-Net: wall time, median round, and the peak
memory of all the run's processes (sum of resident sets, and of proportional sets, which split shared pages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PPFLOWER_QUIET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


# ------------------------------------------------------------------------------------------- memory


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def run_watched(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and peak memory of its whole process tree (Ray's processes included)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "pss": 0, "processes": 0}

    def watch():
        while proc.poll() is None:
            pids = _tree(proc.pid)
            rss, pss = _memory(pids)
            if rss > peak["rss"]:
                peak.update(rss=rss, processes=len(pids))
            peak["pss"] = max(peak["pss"], pss)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall": wall, "peak_rss_bytes": peak["rss"], "peak_pss_bytes": peak["pss"],
            "processes": peak["processes"], "log_tail": out[-500:]}


# ----------------------------------------------------------------------------------------- the runs


def sim_run(args, users: int, width: int, batch: int, steps: int, depth: int = 4, eval_images: int = 8) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scale-u{users}-w{width}-"))
    cores = os.cpu_count() or 1
    rc = {"limit-train": users * steps * batch, "limit-eval": eval_images, "eval-chunk": eval_images,
          "batch-size": batch, "unet-base": width, "unet-depth": depth, "epochs": 1, "augment": True,
          "num-threads": max(1, cores // users), "classifier": args.classifier, "run-dir": str(run_dir),
          "step-timeout": 600.0, "keep-graph": args.keep_graph}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in rc.items())
    cmd = [sys.executable, "-m", "sims.flower_simulation", "--num-supernodes", str(users),
           "--num-cpus", f"{cores / users:g}", "--run-config", text]
    result = run_watched(cmd)
    run = json.loads((run_dir / "run.json").read_text())
    rounds = [r for r in run["rounds"][2:] if r["images"]] or [r for r in run["rounds"] if r["images"]]
    result.update(
        users=users, width=width, batch=batch, steps=steps,
        median_round_s=statistics.median(r["seconds"] for r in rounds),
        median_user_compute_s=statistics.median(r["user_compute"] for r in rounds),
        median_provider_compute_s=statistics.median(r["provider_compute"] for r in rounds),
        median_overhead_s=statistics.median(r["seconds"] - r["user_compute"] - r["provider_compute"] for r in rounds),
        graph_modes=sorted({json.loads((run_dir / f"user-{u['index']}" / "metrics.json").read_text())["graph_mode"]
                            for u in run["users"]}),
        steps_applied=[u["steps_applied"] for u in run["users"]],
    )
    return result


def reference_run(args, width: int, batch: int, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "reference", "--unet-base", str(width), "--batch-size",
           str(batch), "--steps", str(steps), "--classifier", args.classifier]
    return run_watched(cmd)


def reference_main(args) -> None:
    """The in-process loop (ψ, φ, h_θ in one process) for ``--steps`` steps, then exit (timed from outside)."""
    import torch

    from pp_flower.checkpoints import load_classifier
    from pp_flower.config import AppConfig
    from pp_flower.data import load_splits
    from pp_flower.features import load_feature_net
    from pp_flower.reference import train_in_process

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = AppConfig(batch_size=args.batch_size, unet_base=args.unet_base, classifier=args.classifier, augment=True)
    splits = load_splits(None, limit_train=args.steps * args.batch_size)
    classifier, _ = load_classifier(args.classifier)
    train_in_process(cfg, classifier, load_feature_net(None), splits.train_all.images, splits.train_all.labels,
                     splits.train_ids, max_steps=args.steps, steps_per_epoch=args.steps)


def per_step(runner, n1: int, n2: int, repeats: int = 2) -> tuple[float, list[dict]]:
    """(wall(n2) − wall(n1)) / (n2 − n1), each wall the best of ``repeats`` runs."""
    runs = {n: [runner(n) for _ in range(repeats)] for n in (n1, n2)}
    best = {n: min(r["wall"] for r in rs) for n, rs in runs.items()}
    return (best[n2] - best[n1]) / (n2 - n1), [r for rs in runs.values() for r in rs]


def steps_main(args) -> dict:
    out = {"what": "per-step seconds from whole-run walls: (wall(N2) - wall(N1)) / (N2 - N1), best of 2"}
    for width, batch, users_list in ((64, 16, [1]), (16, 128, [1, 4])):
        n1, n2 = args.n1, args.n2
        ref, _ = per_step(lambda n: reference_run(args, width, batch, n), n1, n2)
        row = {"width": width, "batch": batch, "reference_s_per_step": ref, "flower": []}
        print(f"width {width}, batch {batch}: in-process {ref:.3f} s/step", flush=True)
        for users in users_list:
            flower, runs = per_step(lambda n: sim_run(args, users, width, batch, n), n1, n2)
            longest = max(runs, key=lambda r: r["steps"])
            entry = {"users": users, "s_per_round": flower, "images_per_s": users * batch / flower,
                     "ratio_to_reference": ref / flower if users == 1 else None,
                     "internal_median_round_s": longest["median_round_s"],
                     "internal_median_overhead_s": longest["median_overhead_s"],
                     "internal_median_user_compute_s": longest["median_user_compute_s"],
                     "internal_median_provider_compute_s": longest["median_provider_compute_s"],
                     "graph_modes": longest["graph_modes"], "walls": {r["steps"]: r["wall"] for r in runs}}
            row["flower"].append(entry)
            print(f"  Flower, {users} user(s): {flower:.3f} s/round, {entry['images_per_s']:.1f} images/s; "
                  f"overhead {entry['internal_median_overhead_s'] * 1000:.1f} ms/round", flush=True)
        one = row["flower"][0]["images_per_s"]
        for entry in row["flower"][1:]:
            entry["aggregate_to_one_user"] = entry["images_per_s"] / one
        out[f"width{width}_batch{batch}"] = row
    return out


def users_main(args) -> dict:
    rows = []
    for users in args.users:
        r = sim_run(args, users, args.unet_base, args.batch_size, args.steps, depth=2, eval_images=8)
        r.pop("log_tail")
        rows.append(r)
        print(f"{users} users: wall {r['wall']:.1f} s, median round {r['median_round_s']:.3f} s, peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, PSS {r['peak_pss_bytes'] / 2**30:.2f} GiB, "
              f"{r['processes']} processes", flush=True)
    return {"what": "one flower-simulation run per user count (tiny shards, U-Net depth 2)",
            "unet_base": args.unet_base, "batch": args.batch_size, "steps": args.steps, "runs": rows}


def plot_users(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    users = [r["users"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(users, [r["median_round_s"] for r in runs], "o-")
    a.set(xlabel="users", ylabel="median round (s)", title="one SGD step of every user", xscale="log", xticks=users)
    a.set_xticklabels(users)
    b.plot(users, [r["peak_rss_bytes"] / 2**30 for r in runs], "o-", label="sum of RSS")
    b.plot(users, [r["peak_pss_bytes"] / 2**30 for r in runs], "s--", label="sum of PSS")
    b.set(xlabel="users", ylabel="peak memory, all processes (GiB)", title="memory", xscale="log", xticks=users)
    b.set_xticklabels(users)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["steps", "users", "reference"])
    ap.add_argument("--classifier", default="")
    ap.add_argument("--n1", type=int, default=4)
    ap.add_argument("--n2", type=int, default=14)
    ap.add_argument("--users", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--unet-base", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--keep-graph", default="auto")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.what == "reference":
        return reference_main(args)
    if not args.classifier:
        from pp_flower.checkpoints import classifier_blob, save_atomic
        from pp_flower.models import ResNet20

        args.classifier = str(Path(tempfile.mkdtemp()) / "psi.pt")  # speed does not depend on ψ's weights
        save_atomic(classifier_blob(ResNet20(), "resnet20", 10), args.classifier)
    import torch

    result = steps_main(args) if args.what == "steps" else users_main(args)
    result["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        if args.what == "users":
            plot_users(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
