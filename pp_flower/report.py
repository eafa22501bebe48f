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


def save_budget_curve(curve: dict[str, list[dict]], plain_accuracy: float, path: str | Path) -> Path:
    """How h_θ's utility and protection move with its training budget: one line per α over the kept epochs.

    Panels: ψ's test accuracy on x̂ (plain ψ dashed), PSNR to the plain image of x̂ (dotted) and of the ITN-Attack's
    estimate (solid), and the observer's accuracy on x̂ and on the estimates (chance dashed).
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (alpha, points) in enumerate(curve.items()):
        colour = f"C{i}"
        epochs = [p["epoch"] for p in points]
        axes[0].plot(epochs, [100 * p["test-accuracy"] for p in points], "o-", color=colour, label=f"α = {alpha}")
        axes[1].plot(epochs, [p["psnr-estimated"]["median"] for p in points], "o-", color=colour,
                     label=f"α = {alpha}: ITN estimate")
        if all("psnr-protected" in p for p in points):
            axes[1].plot(epochs, [p["psnr-protected"]["median"] for p in points], "s:", color=colour,
                         label=f"α = {alpha}: protected x̂")
        if all("recognisability-estimated" in p for p in points):
            axes[2].plot(epochs, [100 * p["recognisability-estimated"] for p in points], "o-", color=colour,
                         label=f"α = {alpha}: ITN estimate")
        if all("recognisability-protected" in p for p in points):
            axes[2].plot(epochs, [100 * p["recognisability-protected"] for p in points], "s:", color=colour,
                         label=f"α = {alpha}: protected x̂")
    axes[0].axhline(100 * plain_accuracy, color="k", ls="--", lw=1, label="ψ on plain images")
    axes[2].axhline(10, color="grey", ls="--", lw=1, label="chance")
    titles = ("ψ's test accuracy on x̂ (%)", "median PSNR to the plain image (dB)",
              "observer's accuracy (%): recognisability")
    for ax in axes:
        ax.set_xscale("log", base=2)
    return _save_panels(fig, axes, titles, "epochs of h_θ", path)


def save_frontier(rows: list[dict], arch: str, observer_accuracy: float, path: str | Path) -> Path:
    """The protection–utility frontier: ψ's accuracy (y) against what the best attack recovers (x: median PSNR;
    second panel: the observer's accuracy on its estimates), one point per α and per baseline. The paper's
    accuracies are drawn as hollow markers at our measured x (the paper gives no attack PSNR per row)."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    xkeys = (("best-attack-psnr", "best attack (ITN, ITN+feat, restorer): median PSNR of its estimates (dB)  → less "
                                  "protection", 1.0),
             ("recognisability-best-attack", "observer's accuracy on the best attack's estimates (%)  → less "
                                             "protection", 100.0))
    plain = next(r for r in rows if r["row"] == "plain")
    for ax, (key, label, scale) in zip(axes, xkeys):
        alphas = [r for r in rows if r["row"].startswith("alpha") and r.get(key) is not None]
        xs = [scale * r[key] for r in alphas]
        ax.plot(xs, [r[arch]["measured"] for r in alphas], "o-", color="C0", label="h_θ (this run), per α")
        for i, (r, x) in enumerate(zip(alphas, xs)):  # labels above and below in turn: near points overlap
            ax.annotate(f"α={r['row'][5:]}", (x, r[arch]["measured"]), fontsize=7,
                        xytext=(4, 4 if i % 2 == 0 else -11), textcoords="offset points")
        paper = [(x, r[arch]["paper"]) for r, x in zip(alphas, xs) if r[arch]["paper"] is not None]
        if paper:
            ax.plot(*zip(*paper), "o", mfc="none", color="C0", label="h_θ, the paper's accuracy (Table I)")
        for i, r in enumerate(r for r in rows if not r["row"].startswith("alpha") and r["row"] != "plain"):
            if r.get(key) is None:
                continue
            x = scale * r[key]
            ax.plot([x], [r[arch]["measured"]], "s", color=f"C{i + 1}", label=r["method"])
            if r[arch]["paper"] is not None:
                ax.plot([x], [r[arch]["paper"]], "s", mfc="none", color=f"C{i + 1}")
        ax.axhline(plain[arch]["measured"], color="k", ls="--", lw=1, label="ψ on plain images")
        if key.startswith("recognisability"):
            ax.axvline(10, color="grey", ls=":", lw=1, label="chance (10 %)")
            ax.axvline(100 * observer_accuracy, color="grey", ls="--", lw=1, label="observer on plain images")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("ψ's test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Protection–utility frontier (up and to the left is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def save_learning_curve(curves: dict[str, dict], path: str | Path, paper_accuracy: float | None = None,
                        paper_psnr: tuple[float, float] | None = None) -> Path:
    """h_θ's learning curve (``pp_flower.curve``): one line per run (``curves``: label → curve.json) against steps.

    Panels: ψ's accuracy on x̂ (ψ on plain images dashed, the paper's Table I value dotted), the median protected
    PSNR (the paper's range shaded), the observer's accuracy on x̂ (its plain-image ceiling dashed, chance dotted),
    the fraction of saturated pixels and the mean pairwise distance of different images' x̂ (collapse → 0).
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for i, (label, curve) in enumerate(curves.items()):
        colour, points, ref = f"C{i}", curve["points"], curve["reference"]
        steps = [p["step"] for p in points]
        axes[0].plot(steps, [100 * p["psi-accuracy"] for p in points], "-", color=colour, label=label)
        axes[0].axhline(100 * ref["psi-accuracy-plain"], color=colour, ls="--", lw=1)
        axes[1].plot(steps, [p["psnr-protected-median"] for p in points], "-", color=colour, label=label)
        if all("observer-accuracy" in p for p in points):
            axes[2].plot(steps, [100 * p["observer-accuracy"] for p in points], "-", color=colour, label=label)
            axes[2].axhline(100 * ref["observer-accuracy-plain"], color=colour, ls="--", lw=1)
        axes[3].plot(steps, [100 * p["saturated-fraction"] for p in points], "-", color=colour, label=label)
        axes[4].plot(steps, [p["pairwise-rms"] for p in points], "-", color=colour, label=label)
        axes[4].axhline(ref["pairwise-rms-plain"], color=colour, ls="--", lw=1)
    if paper_accuracy is not None:
        axes[0].axhline(paper_accuracy, color="k", ls=":", lw=1, label=f"the paper (Table I): {paper_accuracy:g} %")
    if paper_psnr is not None:
        axes[1].axhspan(*paper_psnr, color="k", alpha=0.12, label=f"the paper: {paper_psnr[0]:g}–{paper_psnr[1]:g} dB")
    axes[2].axhline(10, color="grey", ls=":", lw=1, label="chance")
    titles = ("ψ's accuracy on x̂ (%; dashed: plain)", "median protected PSNR (dB)",
              "observer's accuracy on x̂ (%; dashed: plain)", "saturated pixels (%)",
              "mean pairwise RMS of x̂ (dashed: plain)")
    return _save_panels(fig, axes, titles, "steps of h_θ", path)


def save_defence(points: list[dict], plain_accuracy: float, path: str | Path) -> Path:
    """The grad-noise defence and its price: ψ's test accuracy on x̂ (plain ψ dashed) and the label inference of an
    honest-but-curious user (Li et al. 2022; chance dotted), against the noise level (σ = level·‖g‖/√d per image).

    ``points``: one dict per level with ``grad-noise``, ``test-accuracy`` and ``label-leakage`` (a user's
    pp_flower.label_leakage report)."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    levels = [p["grad-noise"] for p in points]
    xs = list(range(len(levels)))  # levels span orders of magnitude and include 0: evenly spaced, labelled
    axes[0].plot(xs, [100 * p["test-accuracy"] for p in points], "o-", color="C0", label="ψ on x̂")
    axes[0].axhline(100 * plain_accuracy, ls="--", color="grey", label="ψ on plain images")
    for key, marker, name in (("known-10-accuracy", "o-", "10 known labels per class (centroids)"),
                              ("direction-accuracy", "s--", "no known label (clusters, best matching)")):
        axes[1].plot(xs, [100 * (p["label-leakage"] or {}).get(key, float("nan")) if (p["label-leakage"] or {}).get(key)
                          is not None else float("nan") for p in points], marker, label=name)
    chance = next((p["label-leakage"]["chance"] for p in points if p.get("label-leakage")), None)
    if chance is not None:
        axes[1].axhline(100 * chance, ls=":", color="grey", label="chance")
    for ax in axes:
        ax.set_xticks(xs, [f"{v:g}" for v in levels])
        ax.set_ylabel("%")
    return _save_panels(fig, axes, ["utility: ψ's test accuracy on x̂ (%)",
                                    "leakage: labels a user infers from ∂L_class/∂x̂ (%)"],
                        "grad-noise (noise norm ÷ gradient norm)", path)


def _save_panels(fig, axes, titles, xlabel: str, path: Path) -> Path:
    """Title, x label, grid and legend on each panel, then the figure to ``path``."""
    for ax, title in zip(axes, titles):
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
