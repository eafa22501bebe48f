"""Throughput of the split protocol on Flower vs the in-process reference, on this machine.

    python benchmarks/bench_protocol.py --steps 12 --batch-size 128 --unet-base 16 --users 1 2 4

Prints (and writes as JSON with --out) images/s of: the in-process reference (ψ, φ, h_θ in one process),
the Flower app with 1 user, and the aggregate of 1, 2 and 4 users; bytes on the wire per training image;
and where a training round's time goes (user compute on the critical path, provider compute, the rest =
messaging: Flower's polling, serialisation, Ray). Steady state: the first two rounds are excluded.
ψ is a ResNet-20 from --classifier, or a freshly initialised one (speed does not depend on its weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PPFLOWER_QUIET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from pp_flower.checkpoints import classifier_blob, load_classifier, save_atomic  # noqa: E402
from pp_flower.config import AppConfig  # noqa: E402
from pp_flower.data import load_splits  # noqa: E402
from pp_flower.features import load_feature_net  # noqa: E402
from pp_flower.models import ResNet20  # noqa: E402
from pp_flower.transform import init_transform_net, make_optimizer, reference_step, train_batch  # noqa: E402

WARMUP = 2


def bench_reference(cfg: AppConfig, classifier_path: str, steps: int) -> float:
    splits = load_splits(cfg.data_dir or None, limit_train=steps * cfg.batch_size)
    classifier, _ = load_classifier(classifier_path)
    phi = load_feature_net(cfg.vgg_weights or None)
    net = init_transform_net(cfg.unet_base, cfg.unet_depth, cfg.seed, 0)
    opt = make_optimizer(net, cfg.lr, cfg.momentum, cfg.weight_decay)
    seconds, images = 0.0, 0
    for step in range(steps):
        t0 = time.perf_counter()
        ids, x = train_batch(splits.train_all.images, splits.train_ids, step, steps, cfg.batch_size, 0, cfg.augment)
        reference_step(net, opt, classifier, phi, x, splits.train_all.labels[ids], cfg.alpha, wire=cfg.wire)
        if step >= WARMUP:
            seconds += time.perf_counter() - t0
            images += len(ids)
    return images / seconds


def bench_flower(cfg: AppConfig, users: int, steps: int, cores: int) -> dict:
    from runtime.flower_simulation import simulate
    from sims.main import client_app, server_app, start_trainers

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench{users}-"))
    rc = {**cfg.to_run_config(), "limit-train": users * steps * cfg.batch_size, "limit-eval": 8, "eval-chunk": 8,
          "run-dir": str(run_dir), "num-threads": max(1, cores // users)}
    simulate(server_app, client_app, users, rc, num_cpus=min(cores, max(cores / users, 0.5)),
             start_trainers=start_trainers)
    run = json.loads((run_dir / "run.json").read_text())
    rounds = [r for r in run["rounds"][WARMUP:] if r["images"]]  # the last round only applies a gradient
    t = run["timing"]
    seconds = sum(r["seconds"] for r in rounds)
    n_rounds = max(t["steps"], 1)
    return {
        "users": users,
        "images_per_s": sum(r["images"] for r in rounds) / seconds,
        "round_seconds": seconds / len(rounds),
        "user_compute_critical_s": t["user-compute-critical"] / n_rounds,
        "provider_compute_s": t["provider-compute"] / n_rounds,
        "messaging_s": (t["train-seconds"] - t["user-compute-critical"] - t["provider-compute"]) / n_rounds,
        "bytes-per-train-image": t["bytes-per-train-image"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--unet-base", type=int, default=16)
    ap.add_argument("--users", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--classifier", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    classifier = args.classifier
    if not classifier:
        classifier = str(Path(tempfile.mkdtemp()) / "psi.pt")
        save_atomic(classifier_blob(ResNet20(), "resnet20", 10), classifier)
    cfg = AppConfig(batch_size=args.batch_size, unet_base=args.unet_base, classifier=classifier, augment=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
                          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}",
               "batch_size": args.batch_size, "unet_base": args.unet_base, "steps": args.steps}
    results["reference_images_per_s"] = bench_reference(cfg, classifier, args.steps)
    print(f"in-process reference: {results['reference_images_per_s']:.1f} images/s", flush=True)
    results["flower"] = []
    for users in args.users:
        r = bench_flower(cfg, users, args.steps, cores)
        results["flower"].append(r)
        print(f"Flower app, {users} user(s): {r['images_per_s']:.1f} images/s aggregate; per round "
              f"{r['round_seconds']:.3f} s = user {r['user_compute_critical_s']:.3f} + provider "
              f"{r['provider_compute_s']:.3f} + messaging {r['messaging_s']:.3f}; "
              f"{r['bytes-per-train-image']:.0f} B/image on the wire", flush=True)
    one = results["flower"][0]["images_per_s"]
    print(f"1-user Flower / in-process = {one / results['reference_images_per_s']:.2f}")
    for r in results["flower"][1:]:
        print(f"{r['users']} users aggregate / 1 user = {r['images_per_s'] / one:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
