"""Per-image image-quality metrics (torchmetrics) and summaries used by every report."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [0, 1] batches (N, C, H, W): 10·log10(1 / MSE)."""
    return peak_signal_noise_ratio(estimate.float(), target.float(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))


def ssim(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM per image of [0, 1] batches (Gaussian window 11, σ 1.5).

    SSIM lies in [−1, 1]: 1 = the same structure, 0 = no structural similarity, < 0 = anti-correlated structure
    (e.g. a negative-like image: its structure is all there, inverted — not better hidden than at 0)."""
    return structural_similarity_index_measure(estimate.float(), target.float(), data_range=1.0, reduction="none")


def summary(values) -> dict[str, float]:
    """Mean and quartiles of a 1-D collection."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        return {}
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"mean": t.mean().item(), "q1": q[0].item(), "median": q[1].item(), "q3": q[2].item(),
            "min": t.min().item(), "max": t.max().item(), "n": t.numel()}
