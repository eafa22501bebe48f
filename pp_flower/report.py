"""Figures: image grids (the paper's Figs. 5 and 6) and PSNR box plots (Fig. 7)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def save_pairs_grid(rows: list[torch.Tensor], row_labels: list[str], path: str | Path,
                    captions: list[list[str]] | None = None, title: str | None = None) -> Path:
    """One row of images per entry of ``rows`` ([0, 1] tensors (N, 3, H, W)), optional caption under each image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.3 * n + 1.5, 1.6 * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        ax = axes[i][0]
        grid = make_grid(images.clamp(0, 1), nrow=n, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_title(label, loc="left", fontsize=9)
        if captions and captions[i]:
            w = images.shape[-1] + 2
            ax.set_xticks([2 + w * j + images.shape[-1] / 2 for j in range(len(captions[i]))])
            ax.set_xticklabels(captions[i], fontsize=7)
            ax.tick_params(length=0)
        else:
            ax.set_xticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def save_psnr_boxplot(series: dict[str, list[float]], path: str | Path, title: str = "PSNR (dB)") -> Path:
    """The paper's Fig. 7: boxes Q1–Q3 with the median, whiskers at 1.5·IQR, outliers hidden."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.2 * len(series) + 2, 4))
    ax.boxplot(list(series.values()), whis=1.5, showfliers=False)
    ax.set_xticks(range(1, len(series) + 1))
    ax.set_xticklabels(list(series.keys()), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
