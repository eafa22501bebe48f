"""Scale of the Flower app with live users, measured from outside the app (issue: paper scale on Flower).

    python benchmarks/bench_steps.py --configs 64x16 16x128    # per-step time, app vs in-process (was: steps)
    python benchmarks/bench_scale.py users --users 8 16 32 64 --out benchmarks/results_users_cpu2.json
    python benchmarks/bench_scale.py overhead --batch-size 16 --steps 30 --out benchmarks/results_overhead_cpu2.json
    benchmarks/gpu_check.sh        # = bench_scale.py gpu, on one GPU (≤ 8 min on an H100)

``steps`` moved to benchmarks/bench_steps.py (issue #24): here, every reference run but the first started while
the Flower run before it was still shutting down, and best-of-N paired that clean first run with contaminated
longer ones, so the in-process loop looked slower than it is. Every run here now starts only once the processes
of the run before it are gone (bench_steps.wait_until_gone).

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

import psutil  # noqa: E402
from bench_steps import Run, wait_until_gone  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)

from runtime.deploy_local import descendants  # noqa: E402  (a process and everything below it, via psutil)
from runtime.signals import die_with_parent  # noqa: E402  (a run never outlives the benchmark that started it)

_previous: list[Run | None] = [None]  # the last run's processes: the next run starts once they are gone


# ------------------------------------------------------------------------------------------- memory


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
    """Run ``cmd`` (once no process of the run before remains); wall seconds and peak memory of its whole process
    tree (Ray's processes included)."""
    wait_until_gone(_previous[0], 180.0)
    seen: dict[int, psutil.Process] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
    peak = {"rss": 0, "pss": 0, "processes": 0}

    def watch():
        while proc.poll() is None:
            pids = descendants(proc.pid)
            for pid in set(pids) - set(seen):
                try:
                    seen[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
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
    _previous[0] = Run("run", 0, None, cmd, pid=proc.pid, seen=list(seen.values()))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall": wall, "peak_rss_bytes": peak["rss"], "peak_pss_bytes": peak["pss"],
            "processes": peak["processes"], "log_tail": out[-500:]}


# ----------------------------------------------------------------------------------------- the runs


def sim_run(args, users: int, width: int, batch: int, steps: int, depth: int = 4, eval_images: int = 8,
            num_gpus: float = 0.0, extra: dict | None = None) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"scale-u{users}-w{width}-"))
    cores = os.cpu_count() or 1
    rc = {"limit-train": users * steps * batch, "limit-eval": eval_images, "eval-chunk": eval_images,
          "batch-size": batch, "unet-base": width, "unet-depth": depth, "epochs": 1, "augment": True,
          "num-threads": max(1, cores // users), "classifier": args.classifier, "run-dir": str(run_dir),
          "step-timeout": 600.0, "keep-graph": args.keep_graph, **(extra or {})}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in rc.items())
    cmd = [sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", str(users),
           "--num-cpus", f"{cores / users:g}", "--run-config", text]
    if num_gpus:
        cmd += ["--num-gpus", f"{num_gpus:g}"]
    result = run_watched(cmd)
    run = json.loads((run_dir / "run.json").read_text())
    rounds = [r for r in run["rounds"][2:] if r["images"]] or [r for r in run["rounds"] if r["images"]]
    result.update(
        users=users, width=width, batch=batch, steps=steps,
        median_round_s=statistics.median(r["seconds"] for r in rounds),
        median_user_compute_s=statistics.median(r["user-compute"] for r in rounds),
        median_provider_compute_s=statistics.median(r["provider-compute"] for r in rounds),
        median_overhead_s=statistics.median(r["seconds"] - r["user-compute"] - r["provider-compute"] for r in rounds),
        graph_modes=sorted({json.loads((run_dir / f"user-{u['index']}" / "metrics.json").read_text())["graph-mode"]
                            for u in run["users"]}),
        steps_applied=[u["steps-applied"] for u in run["users"]],
    )
    return result


def reference_run(args, width: int, batch: int, steps: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "reference", "--unet-base", str(width), "--batch-size",
           str(batch), "--steps", str(steps), "--classifier", args.classifier, "--device", device]
    return {**run_watched(cmd), "steps": steps}


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
    train_in_process(cfg, classifier, load_feature_net(None, device=args.device), splits.train_all.images,
                     splits.train_all.labels, splits.train_ids, max_steps=args.steps, steps_per_epoch=args.steps,
                     device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def per_step(runners: dict, n1: int, n2: int, repeats: int = 2) -> tuple[dict, list[dict]]:
    """Per runner: (wall(n2) − wall(n1)) / (n2 − n1), each wall the best of ``repeats`` runs. The runners' runs
    are interleaved (a, b, a, b, …) so that a slow spell of a shared machine does not favour one of them."""
    walls: dict = {name: {n1: [], n2: []} for name in runners}
    runs = []
    for _ in range(repeats):
        for n in (n1, n2):
            for name, runner in runners.items():
                r = runner(n)
                walls[name][n].append(r["wall"])
                runs.append({**r, "runner": name})
    return {name: (min(w[n2]) - min(w[n1])) / (n2 - n1) for name, w in walls.items()}, runs


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


def overhead_main(args) -> dict:
    """Per-round overhead (round − user compute − provider compute) at U-Net widths 64 and 16, same batch: does the
    cost of a step beyond its compute still depend on h_θ's size? Long runs, interleaved, median of all rounds."""
    rows = {64: [], 16: []}
    for _ in range(args.repeats):
        for width in rows:
            r = sim_run(args, 1, width, args.batch_size, args.steps)
            rows[width].append(r["median_overhead_s"])
    out = {"what": overhead_main.__doc__.split(":")[0], "batch": args.batch_size, "steps": args.steps,
           "median_overhead_s": {w: statistics.median(v) for w, v in rows.items()}, "runs": rows}
    out["ratio_64_to_16"] = out["median_overhead_s"][64] / out["median_overhead_s"][16]
    print(f"overhead per round: width 64 {out['median_overhead_s'][64] * 1000:.1f} ms, width 16 "
          f"{out['median_overhead_s'][16] * 1000:.1f} ms (ratio {out['ratio_64_to_16']:.2f})", flush=True)
    return out


def gpu_main(args) -> dict:
    """benchmarks/gpu_check.sh: the paper's width on one GPU (or, with --dry, a tiny CPU rehearsal of the same)."""
    width, batch, device = (8, 8, "cpu") if args.dry else (64, 128, "cuda")
    n1, n2 = (2, 4) if args.dry else (20, 60)
    gpus = 0.0 if args.dry else 1.0
    out = {"what": "one GPU: in-process vs Flower (1 user), 8 users on GPU shares, a short paper-recipe run",
           "width": width, "batch": batch, "device": device}
    per, _ = per_step({"reference": lambda n: reference_run(args, width, batch, n, device),
                       "flower": lambda n: sim_run(args, 1, width, batch, n, num_gpus=gpus)}, n1, n2, repeats=1)
    ref, flower = per["reference"], per["flower"]
    out["one_user"] = {"reference_s_per_step": ref, "flower_s_per_step": flower, "ratio": ref / flower}
    print(f"1 user: in-process {ref * 1000:.1f} ms/step, Flower {flower * 1000:.1f} ms/step, ratio {ref / flower:.2f}",
          flush=True)
    eight = sim_run(args, 8, width, batch, n1, num_gpus=gpus / 8)
    eight.pop("log_tail")
    out["eight_users"] = eight
    print(f"8 users on 1/8 GPU each: median round {eight['median_round_s'] * 1000:.1f} ms, "
          f"{8 * batch / eight['median_round_s']:.0f} images/s", flush=True)
    steps = 8 if args.dry else 350  # 1 epoch of 45,000 images at batch 128 = 352 steps
    paper = sim_run(args, 1, width, batch, steps, num_gpus=gpus, eval_images=500 if not args.dry else 8,
                    extra={"alpha": 0.005, "lr": 0.1, "augment": True})
    paper.pop("log_tail")
    out["paper_recipe_one_epoch"] = paper
    per_epoch = paper["median_round_s"] * 352
    out["paper_estimate"] = {"seconds_per_epoch": per_epoch, "gpu_hours_200_epochs_one_alpha": per_epoch * 200 / 3600}
    print(f"paper recipe: {paper['median_round_s'] * 1000:.1f} ms/step → {per_epoch * 200 / 3600:.2f} GPU-hours "
          "for 200 epochs of one α", flush=True)
    return out


def plot_users(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    runs = result["runs"]
    users = [r["users"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(users, [r["median_round_s"] for r in runs], "o-")
    a.set(xlabel="users", ylabel="median round (s)", title="one SGD step of every user (2 cores)")
    b.plot(users, [r["peak_rss_bytes"] / 2**30 for r in runs], "o-", label="sum of RSS")
    b.plot(users, [r["peak_pss_bytes"] / 2**30 for r in runs], "s--", label="sum of PSS (shared pages split)")
    b.set(xlabel="users", ylabel="peak memory, all processes (GiB)", title="memory of the whole run", ylim=(0, None))
    b.legend(loc="lower right")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(users))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(u) for u in users])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["steps"]:
        raise SystemExit("bench_scale.py steps was replaced by benchmarks/bench_steps.py (issue #24), e.g.\n"
                         "    python benchmarks/bench_steps.py --configs 64x16 16x128")
    ap.add_argument("what", choices=["users", "overhead", "reference", "plot", "gpu"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dry", action="store_true", help="gpu: rehearse on CPU at tiny sizes")
    ap.add_argument("--classifier", default="")
    ap.add_argument("--users", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--unet-base", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--keep-graph", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="overhead: runs per width")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.what == "reference":
        return reference_main(args)
    if args.what == "plot":  # redraw the users figure from its JSON
        return plot_users(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
    if not args.classifier:
        from pp_flower.checkpoints import classifier_blob, save_atomic
        from pp_flower.models import ResNet20

        args.classifier = str(Path(tempfile.mkdtemp()) / "psi.pt")  # speed does not depend on ψ's weights
        save_atomic(classifier_blob(ResNet20(), "resnet20", 10), args.classifier)
    import torch

    result = {"users": users_main, "overhead": overhead_main, "gpu": gpu_main}[args.what](args)
    accelerator = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    result["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {accelerator}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        if args.what == "users":
            plot_users(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
