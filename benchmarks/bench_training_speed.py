"""Training-step speed of ψ (fp32 / channels-last / + bf16 autocast) and of h_θ per U-Net architecture.

    python benchmarks/bench_training_speed.py [--threads 2] [--out benchmarks/results_training_speed_cpu2.json]

Synthetic tensors, no data loading: the step itself (ψ: augmentation included; h_θ: U-Net + ψ + φ, the paper's
L_trans, forward and backward) is what the cpu preset's recipe choices change.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch.nn import functional as F


def timed(step, warmup: int = 3, repeats: int = 8) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def psi_rows(batch_sizes=(128, 256)) -> list[dict]:
    from pp_flower.data import augment, to_float
    from pp_flower.models import ResNet20

    rows = []
    images = torch.randint(0, 256, (max(batch_sizes), 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (max(batch_sizes),))
    for bs in batch_sizes:
        for channels_last, bf16 in ((False, False), (True, False), (True, True)):
            torch.manual_seed(0)
            model = ResNet20()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(0)

            def step():
                x = to_float(augment(images[:bs], g))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), labels[:bs], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()

            seconds = timed(step)
            rows.append({"model": "psi-resnet20", "batch": bs, "channels-last": channels_last, "bf16-autocast": bf16,
                         "seconds-per-step": round(seconds, 4), "images-per-second": round(bs / seconds, 1)})
            print(rows[-1], flush=True)
    return rows


def transform_rows(settings=((16, 64), (32, 64))) -> list[dict]:
    from pp_flower.features import load_feature_net
    from pp_flower.models import ResNet20, UNet

    phi = load_feature_net(None, 9, "cpu")
    psi = ResNet20().eval().requires_grad_(False)
    rows = []
    for base, bs in settings:
        for arch in ("paper", "ours"):
            torch.manual_seed(0)
            net = UNet(base, arch=arch)
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            x, y = torch.rand(bs, 3, 32, 32), torch.randint(0, 10, (bs,))

            def step():
                xhat = net(x)
                loss = F.cross_entropy(psi(xhat), y) - 0.005 * F.mse_loss(phi(xhat), phi(x).detach())
                opt.zero_grad()
                loss.backward()
                opt.step()

            seconds = timed(step, warmup=1, repeats=4)
            rows.append({"model": f"h_theta-unet-{arch}", "width": base, "batch": bs,
                         "seconds-per-step": round(seconds, 4), "images-per-second": round(bs / seconds, 1)})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
              "psi": psi_rows(), "transform": transform_rows()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
