"""Whether ``num_supernodes`` live users fit in this machine's memory, decided before Ray starts (issue #24).

A live user holds, for the whole run, in its trainer's process:

* h_θ's parameters four times: θ, its gradient, SGD momentum and the best epoch's copy (4 × 4 bytes per parameter);
* the label probe's gradients: ``probe-images`` of its own training images (or all of them when it has fewer),
  one float16 direction each (2 bytes per pixel × channel);
* bookkeeping: its ids, curves and Flower's per-node state (``PER_USER_OVERHEAD``, measured);

and the run has a fixed cost: ψ in the driver, Ray's and Flower's processes, two trainers' torch
(``FIXED``, measured). Kept autograd graphs are not counted: ``keep-graph=auto`` keeps them only while they fit.
The two constants come from BENCHMARKS.md's "Many users" runs (PSS, shared pages split between processes).
"""

from __future__ import annotations

from dataclasses import dataclass

from pp_flower.config import AppConfig
from pp_flower.errors import PPFlowerError

# Fitted to BENCHMARKS.md's "Many users" runs (PSS of every process; width 8, depth 2, batch 8): 8 → 64 users
# grow by 11.9 MiB a user, 64 → 1,000 users by 11.8 MiB; 8 users take 2.99 GiB, 1,000 users 14.45 GiB.
FIXED = 3.0 * 2**30             # bytes: driver with ψ, Ray, Flower, two trainers with torch and φ
PER_USER_OVERHEAD = 11 * 2**20  # bytes: the rest of the 11.8 MiB a user (its modules, kept graph, ids, curves,
#                                 Flower's node state), beside θ's four copies and the probe counted below
TRAIN_IMAGES = 45_000           # the paper's split of CIFAR-10 when limit-train = 0
PIXELS = 3 * 32 * 32


@dataclass
class Estimate:
    users: int
    per_user: int     # bytes
    fixed: int        # bytes
    available: int    # bytes

    @property
    def total(self) -> int:
        return self.fixed + self.users * self.per_user

    @property
    def most_users(self) -> int:
        return max(0, int((self.available - self.fixed) // self.per_user))


def transform_parameters(cfg: AppConfig) -> int:
    """h_θ's parameter count for the run's unet-base, unet-depth and unet-arch (a model is built on the meta
    device: no memory, no time)."""
    import torch

    from pp_flower.models import UNet

    with torch.device("meta"):
        net = UNet(cfg.unet_base, cfg.unet_depth, arch=cfg.unet_arch)
    return sum(p.numel() for p in net.parameters())


def per_user_bytes(cfg: AppConfig, users: int) -> int:
    """Bytes one live user holds for the whole run (see the module's docstring)."""
    own_images = -(-(cfg.limit_train or TRAIN_IMAGES) // users)
    probe = min(cfg.probe_images, own_images) * PIXELS * 2
    return 16 * transform_parameters(cfg) + probe + PER_USER_OVERHEAD


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable; psutil)."""
    import psutil

    return psutil.virtual_memory().available


def estimate(cfg: AppConfig, users: int, available: int | None = None) -> Estimate:
    return Estimate(users, per_user_bytes(cfg, users), int(FIXED),
                    available_memory() if available is None else available)


def check_capacity(run_config: dict, num_supernodes: int, available: int | None = None) -> Estimate:
    """Refuse, in one line, a simulation whose users cannot fit in memory; else the estimate.

    Raises:
        PPFlowerError: what the run would need, what the machine has, and how many users would fit.
    """
    cfg = AppConfig.from_run_config(run_config)
    est = estimate(cfg, num_supernodes, available)
    if est.total > est.available:
        gib = 2**30
        raise PPFlowerError(
            f"{num_supernodes} users need about {est.total / gib:.1f} GiB ({est.per_user / 2**20:.1f} MiB each: h_θ "
            f"at unet-base {cfg.unet_base} four times, the label probe, bookkeeping; plus {est.fixed / gib:.1f} GiB "
            f"for ψ, Ray and Flower), but this machine has {est.available / gib:.1f} GiB available: at most "
            f"{est.most_users} users fit here. Use fewer users, a smaller unet-base, probe-images=0, or a Ray "
            "cluster (--ray-address).")
    return est
