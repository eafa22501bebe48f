"""sims/capacity.py: what a live user holds, and the one-line refusal of a simulation that cannot fit (issue #24)."""

from __future__ import annotations

import pytest

from pp_flower.config import AppConfig
from pp_flower.errors import PPFlowerError
from pp_flower.models import UNet
from sims import capacity

GIB = 2**30


def test_per_user_bytes_counts_four_copies_of_theta_the_probe_and_bookkeeping():
    cfg = AppConfig(unet_base=8, unet_depth=2, probe_images=2000, limit_train=8000)
    params = sum(p.numel() for p in UNet(8, 2).parameters())
    assert capacity.transform_parameters(cfg) == params
    # 8,000 images over 4 users: each keeps 2,000 probe gradients of 3×32×32 float16
    assert capacity.per_user_bytes(cfg, 4) == 16 * params + 2000 * 3072 * 2 + capacity.PER_USER_OVERHEAD
    # over 1,000 users each has 8 images: the probe keeps no more than those
    assert capacity.per_user_bytes(cfg, 1000) == 16 * params + 8 * 3072 * 2 + capacity.PER_USER_OVERHEAD
    wide = AppConfig(unet_base=64, probe_images=0, limit_train=8000)
    assert capacity.per_user_bytes(wide, 4) > 400 * 2**20  # the paper's width: 31 M parameters × 16 bytes


def test_a_run_that_fits_passes_and_one_that_does_not_is_one_line():
    config = AppConfig(unet_base=8, unet_depth=2, probe_images=0, limit_train=8000).to_run_config()
    est = capacity.check_capacity(config, 100, available=24 * GIB)
    assert est.total < 24 * GIB and est.most_users > 100
    with pytest.raises(PPFlowerError) as info:
        capacity.check_capacity(config, 100_000, available=24 * GIB)
    line = str(info.value)
    assert "\n" not in line and "100000 users need about" in line
    assert f"at most {est.most_users} users fit here" in line
