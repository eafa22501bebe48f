"""The paper's losses as pure functions (Ito, Kinoshita, Kiya, Eqs. (4)–(6)).

    L_class = CE(ψ(x̂), y)                          (4)
    L_feat  = mean ‖φ_k(x̂) − φ_k(x)‖²               (5)
    L_trans = L_class − α · L_feat                  (6)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def class_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (4): mean cross-entropy of ψ's logits on protected images."""
    return F.cross_entropy(logits, labels)


def feature_loss(features_protected: torch.Tensor, features_plain: torch.Tensor) -> torch.Tensor:
    """Eq. (5): mean squared difference of φ_k features (large = protected image looks unlike the plain one)."""
    return F.mse_loss(features_protected, features_plain)


def transform_loss(l_class: torch.Tensor, l_feat: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. (6): L_trans = L_class − α · L_feat."""
    return l_class - alpha * l_feat


def lr_at(epoch: int, epochs: int, base_lr: float = 0.1, gamma: float = 0.2,
          milestones: tuple[float, ...] = (0.3, 0.6, 0.8)) -> float:
    """The paper's step schedule: ``base_lr`` × ``gamma`` at 30 %, 60 % and 80 % of the epochs (60/120/160 of 200)."""
    passed = sum(epoch >= max(1, round(m * epochs)) for m in milestones)
    return base_lr * gamma**passed


def one_cycle_lr(epoch: float, epochs: int, peak_lr: float, warmup: float = 0.2) -> float:
    """A one-cycle schedule (Smith & Topin 2019) at a fractional epoch: linear warm-up from peak/10 to the peak over
    the first ``warmup`` of training, then linear decay to 0. It reaches in tens of epochs what the step schedule
    needs hundreds for: the CPU preset's deviation, the paper uses :func:`lr_at`."""
    f = min(max(epoch / epochs, 0.0), 1.0)
    if f < warmup:
        return peak_lr * (0.1 + 0.9 * f / warmup)
    return peak_lr * (1.0 - f) / (1.0 - warmup)
