"""What the `paper` preset costs: FLOPs per training step of every stage, counted by torch, times the paper's
step counts, and one measured CPU step at the paper's width for scale.

    python benchmarks/bench_paper_budget.py --out benchmarks/results_paper_budget.json

GPU hours are an estimate: total FLOPs / an assumed sustained fp32 throughput (``--sustained-tflops``, default
20 TFLOP/s, about a third of an H100's fp32 peak; small 32×32 convolutions rarely do better). No GPU was used.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

TRAIN, EPOCHS, ALPHAS = 45_000, 200, 6


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    from pp_flower.features import load_feature_net
    from pp_flower.models import UNet, build_classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sustained-tflops", type=float, default=20.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bs = 128
    x, y = torch.rand(bs, 3, 32, 32), torch.randint(0, 10, (bs,))
    phi = load_feature_net(None, 9, "cpu")
    stages = {}

    for arch in ("resnet20", "vgg16"):
        psi = build_classifier(arch)

        def psi_step():
            F.cross_entropy(psi(x), y).backward()

        stages[f"psi-{arch}"] = {"flops-per-step": step_flops(psi_step), "steps": EPOCHS * TRAIN // bs,
                              "runs": 5}  # plain and the four baseline rows (the GAN generator is not counted)
        frozen = build_classifier(arch).eval().requires_grad_(False)
        net = UNet(64, arch="paper")

        def h_step():
            xhat = net(x)
            (F.cross_entropy(frozen(xhat), y) - 0.005 * F.mse_loss(phi(xhat), phi(x))).backward()

        stages[f"transform-{arch}"] = {"flops-per-step": step_flops(h_step), "steps": EPOCHS * TRAIN // bs,
                                       "runs": ALPHAS}
        started = time.perf_counter()
        h_step()
        stages[f"transform-{arch}"]["cpu-seconds-one-step"] = round(time.perf_counter() - started, 2)
    inverse = UNet(64, arch="paper")

    def attack_step():
        F.mse_loss(inverse(net(x).detach()), x).backward()

    stages["attack"] = {"flops-per-step": step_flops(attack_step), "steps": EPOCHS * TRAIN // bs,
                        "runs": 2 * (ALPHAS + 4)}  # every α row and baseline, for both columns
    total = sum(s["flops-per-step"] * s["steps"] * s["runs"] for s in stages.values())
    result = {"batch": bs, "epochs": EPOCHS, "train-images": TRAIN, "stages": stages, "total-flops": total,
              "sustained-tflops-assumed": args.sustained_tflops,
              "gpu-hours-estimate": round(total / (args.sustained_tflops * 1e12) / 3600, 1)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
