"""The in-process reference: one user's h_θ trained by computing L_trans (Eq. 6) directly, ψ in hand.

This is what the split protocol must reproduce exactly (tests/test_flower_app.py) and the baseline the
benchmark compares the Flower app against. It shares batch order, augmentation, initialisation and the
learning-rate schedule with pp_flower.user, and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from pp_flower.config import AppConfig
from pp_flower.progress import track
from pp_flower.transform import init_transform_net, make_optimizer, reference_step, set_lr, train_batch, user_seed
from pp_flower.transform import steps_per_epoch as epoch_steps


def train_in_process(cfg: AppConfig, classifier: nn.Module, feature_net: nn.Module, train_images: torch.Tensor,
                     train_labels: torch.Tensor, shard_ids: torch.Tensor, user_index: int = 0,
                     steps_per_epoch: int | None = None, max_steps: int | None = None,
                     device: str = "cpu") -> tuple[nn.Module, list[tuple[float, float]]]:
    """Train h_θ for ``cfg.epochs`` epochs (or ``max_steps``); returns h_θ and (L_class, L_feat) per step."""
    net = init_transform_net(cfg.unet_base, cfg.unet_depth, cfg.seed, user_index, cfg.unet_arch).to(device)
    classifier = classifier.to(device).eval()
    opt = make_optimizer(net, cfg.lr, cfg.momentum, cfg.weight_decay)
    spe = steps_per_epoch or epoch_steps(len(shard_ids), cfg.batch_size)
    total = spe * cfg.epochs if max_steps is None else max_steps
    losses = []
    for step in track(range(total), "h_θ (in-process)"):
        ids, x = train_batch(train_images, shard_ids, step, spe, cfg.batch_size, user_seed(cfg.seed, user_index),
                             cfg.augment)
        set_lr(opt, step // spe, cfg.epochs, cfg.lr)
        losses.append(reference_step(net, opt, classifier, feature_net, x.to(device), train_labels[ids].to(device),
                                     cfg.alpha, wire=cfg.wire))
    return net, losses
