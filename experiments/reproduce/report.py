"""What ``ppflower reproduce`` writes: Table I (JSON and markdown), its figures and its provenance.

Every function here reads stage outputs the pipeline (:mod:`experiments.reproduce.pipeline`) left on disk and
writes results; none trains anything. ``portable``, ``git_commit`` and ``machine`` are the provenance helpers
``ppflower curve`` (:mod:`experiments.curve`) uses too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from experiments.reproduce.presets import BASELINE_KEYS, PAPER_ACCURACY, ROW_NAMES, Preset, row_key
from pp_flower.errors import PPFlowerError

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ provenance
def portable(text: str, root: Path = REPO) -> str:
    """``text`` with this checkout's absolute paths made relative to the repo (its parent as ``..``): results
    carry provenance, not one machine's directory layout. Only whole paths are rewritten: with the repo at
    ``/srv/repo``, ``/tmp/srv/psi`` stays as it is (a plain substring replace made it "/tmp../psi")."""
    for prefix, repl in ((f"{root}{os.sep}", ""), (f"{root.parent}{os.sep}", f"..{os.sep}")):
        text = re.sub(r"(?<![\w.~/-])" + re.escape(prefix), lambda _, r=repl: r, text)
    return text


def git_commit() -> str:
    """This checkout's commit, marked when tracked files outside ``results/`` have uncommitted changes (the
    results a run is rewriting are its outputs, not a change to the code that made them)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               capture_output=True, text=True, cwd=REPO).stdout.strip()
        return (sha or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def machine() -> str:
    """The machine and the versions that produced a result, in one line."""
    from importlib.metadata import PackageNotFoundError, version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:  # the stand-alone commands (train-classifier, curve, attack) run without Flower, e.g. on a GPU box
        flwr = version("flwr")
    except PackageNotFoundError:
        flwr = "not installed"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, flwr {flwr}")


def read_json(path: Path) -> dict:
    """A stage's JSON output; a missing one is an unfinished stage."""
    if not path.exists():
        raise PPFlowerError(f"{path} is missing; rerun `ppflower reproduce` to finish that stage.")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ Table I
def table_rows(preset: Preset) -> list[str]:
    """Table I's rows of ``preset``, in the paper's order."""
    return ["plain", *(b for b in ("tanaka", "pixel", "pixel-per-image", "gan") if b in preset.baselines),
            *(row_key(a) for a in preset.alphas)]


def build_table(preset: Preset, columns: dict, attack_results: dict[str, dict], strong: dict[str, Path],
                restorers: dict[str, Path] | None = None) -> list[dict]:
    """One entry per row: the measured accuracy per architecture beside the paper's, and the attacks' results.

    ``columns[arch][row]`` holds each row's accuracy (stage outputs), ``attack_results[row]`` each row's
    ``attack.json`` (the paper's ITN), ``strong[row]`` / ``restorers[row]`` the stage directories of the ITN with
    a VGG feature loss and of the paired restorer. *Best attack*: the strongest of them by each criterion
    separately (median PSNR, median SSIM, the observer's accuracy on the estimates)."""
    restorers = restorers or {}
    table = []
    for row in table_rows(preset):
        entry = {"row": row, "method": ROW_NAMES[row]}
        for arch in preset.archs:
            measured = columns[arch][row]["accuracy"]
            entry[arch] = {"measured": round(100 * measured, 2), "paper": PAPER_ACCURACY[row][arch]}
            if "key" in columns[arch][row]:
                entry["key"] = columns[arch][row]["key"]
            if "accuracy-per-user" in columns[arch][row]:
                entry[arch]["per-user"] = [round(100 * a, 2) for a in columns[arch][row]["accuracy-per-user"]]
            if arch == preset.archs[0] and "wire" in columns[arch][row]:
                entry["wire"] = columns[arch][row]["wire"]
                entry["label-leakage"] = columns[arch][row].get("label-leakage")
        if row in attack_results:
            r = attack_results[row]
            entry.setdefault("wire", r.get("wire"))  # a baseline's encrypted images travel as 8-bit images too
            entry["protected-psnr"] = r.get("psnr-protected")
            entry["protected-ssim"] = r.get("ssim-protected")
            entry["itn-psnr"] = r["psnr-estimated"]
            entry["itn-ssim"] = r["ssim-estimated"]
            entry["recognisability-protected"] = r.get("recognisability-protected")
            entry["recognisability-itn"] = r.get("recognisability-estimated")
            others = {"ITN": r}
            if row in strong:
                others["ITN+feat"] = st = read_json(strong[row] / "attack.json")
                entry["strong-psnr"], entry["strong-ssim"] = st["psnr-estimated"], st["ssim-estimated"]
                entry["strong-weight"] = st["config"]["perceptual"]
            if row in restorers:
                others["restorer"] = rr = read_json(restorers[row] / "attack.json")
                entry["restorer-psnr"], entry["restorer-ssim"] = rr["psnr-estimated"], rr["ssim-estimated"]
                entry["recognisability-restorer"] = rr.get("recognisability-estimated")
            for key, pick in (("best-attack-psnr", lambda a: a["psnr-estimated"]["median"]),
                              ("best-attack-ssim", lambda a: a["ssim-estimated"]["median"]),
                              ("recognisability-best-attack", lambda a: a.get("recognisability-estimated"))):
                scored = {name: pick(a) for name, a in others.items() if pick(a) is not None}
                best = max(scored, key=scored.get) if scored else None
                entry[key] = scored[best] if best else None
                entry[f"{key}-by"] = best
        table.append(entry)
    return table


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v, row: str) -> str:
    return ("—" if row == "plain" else "n/a") if v is None else f"{100 * v:.1f}"


def _by(e: dict, key: str) -> str:
    """" (restorer)": which attacker won ``key``, when more than one competed."""
    by = e.get(f"{key}-by")
    return f" ({by})" if by and ("strong-psnr" in e or "restorer-psnr" in e) else ""


def _best_attack(e: dict) -> str:
    """The best attack's PSNR / SSIM cell, each with the attacker that reached it."""
    if "best-attack-psnr" not in e:
        return "—"
    psnr, ssim = _fmt(e["best-attack-psnr"]), _fmt(e["best-attack-ssim"], 3)
    by_psnr, by_ssim = _by(e, "best-attack-psnr"), _by(e, "best-attack-ssim")
    return f"{psnr} / {ssim}{by_psnr}" if by_psnr == by_ssim else f"{psnr}{by_psnr} / {ssim}{by_ssim}"


def _leak(e: dict) -> str:
    """Label inference of Table I's label-leakage column: known-10 / direction accuracy (%), or why none."""
    leak = e.get("label-leakage")
    if not leak:
        return "—" if e["row"] == "plain" or "wire" not in e else "n/a"
    if "error" in leak:
        return "n/a"
    return f"{_pct(leak.get('known-10-accuracy'), e['row'])} / {_pct(leak.get('direction-accuracy'), e['row'])}"


def defence_markdown(points: list[dict], alpha: float) -> list[str]:
    """The grad-noise defence as a markdown table (``defence.json``'s points)."""
    if not points:
        return []
    lines = ["## The grad-noise defence and its price", "",
             f"h_θ at α = {alpha:g}, trained with the provider adding N(0, σ²) to each returned ∂L_class/∂x̂, "
             "σ = grad-noise·‖g‖/√d per image (so grad-noise is the noise norm over the gradient norm). Label "
             "inference: what a user infers of the labels of its own training images from the gradients it "
             "received (`fig_defence.png`).", "",
             "| grad-noise | ψ on x̂ (%) | labels inferred, 10 known per class (%) | labels inferred, none known (%) "
             "| chance (%) |", "|---|---|---|---|---|"]
    for pt in points:
        leak = pt.get("label-leakage") or {}
        lines.append(f"| {pt['grad-noise']:g} | {100 * pt['test-accuracy']:.2f} | "
                     f"{_pct(leak.get('known-10-accuracy'), 'x')} | {_pct(leak.get('direction-accuracy'), 'x')} | "
                     f"{_pct(leak.get('chance'), 'x')} |")
    return [*lines, ""]


def markdown(table: list[dict], p: Preset, meta: dict, defence: list[dict] = ()) -> str:
    lines = [f"# Table I — preset `{p.name}`", "",
             "Test accuracy of ψ on each kind of image (%), measured by this product on the same data, beside the "
             "paper's Table I; protected-image PSNR and the ITN-Attack's estimate PSNR (medians over the test "
             "images, dB; lower = better protection); SSIM lies in [−1, 1] (1 = the plain image's structure, 0 = "
             "none, < 0 = inverted structure, e.g. a negative-like image). Every attacker trains and is measured on "
             "the tensor the provider received (the *wire* column). *Best attack*: the strongest of the paper's "
             "ITN-Attack (`ITN`), the ITN with a VGG16 feature loss (`ITN+feat`, weight chosen on validation, "
             "`strong_sweep.json`) and the paired restorer (`restorer`: Adam, L1 + VGG16 perceptual loss), chosen "
             "separately by median PSNR, by median SSIM and by the observer; the winner of each is named. "
             "*Recognisable*: test accuracy (%) of an independent classifier trained on plain images (the "
             "observer), on the protected images and on the best attack's estimates; chance is 10 %, plain "
             f"images give the observer's {100 * meta.get('observer-accuracy', float('nan')):.1f} %.", "",
             "## Deviations from the paper", "", *(f"- {d}" for d in p.deviations), "",
             "## Table", ""]
    head = ["Method"]
    for arch in p.archs:
        name = {"resnet20": "ResNet-20", "vgg16": "VGG16-BN"}[arch]
        head += [f"{name} measured", f"{name} paper"]
    head += ["wire", "protected PSNR", "ITN-Attack PSNR", "ITN-Attack SSIM", "best attack PSNR / SSIM",
             "recognisable: protected", "recognisable: best attack", "labels inferred: 10 known / none (%)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        key = e.get("key")
        cells = [e["method"] + ("" if key is None else f" (trained toward key {key}; G has no key)"
                                if e["row"] == "gan" else f" (key {key})")]
        for arch in p.archs:
            cells += [_fmt(e[arch]["measured"]), _fmt(e[arch]["paper"])]
        prot = e.get("protected-psnr")
        no_psnr = "—" if e["row"] == "plain" else "n/a (6 channels)"
        cells += [e.get("wire", "—"), no_psnr if prot is None else _fmt(prot["median"]),
                  _fmt(e["itn-psnr"]["median"]) if "itn-psnr" in e else "—",
                  _fmt(e["itn-ssim"]["median"], 3) if "itn-ssim" in e else "—",
                  _best_attack(e), _pct(e.get("recognisability-protected"), e["row"]),
                  _pct(e.get("recognisability-best-attack"), e["row"]) + _by(e, "recognisability-best-attack"),
                  _leak(e)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paper columns: the numbers printed in the paper's Table I; — where the paper gives none. "
              "*Labels inferred*: the share of its own training images whose label a user infers from the "
              "∂L_class/∂x̂ it received (Li et al. 2022): with 10 known labels per class (nearest class centroid) / "
              "with none (clusters matched to classes at best: an upper bound); chance is 10 %. "
              "Every measured cell comes from this run's JSON files (`table1.json`, `attack/*.json`, "
              "`transform-*/user-*.json`).", "", *defence_markdown(list(defence), p.defence_alpha),
              "## Provenance", "",
              f"- Command: `{meta['command']}`",
              f"- Commit: `{meta['commit']}`",
              f"- Machine: {meta['machine']} (device: {meta['device']})",
              f"- Wall time, all stages: {meta['wall-seconds-all-stages'] / 60:.1f} min "
              f"(per stage in `stages.json`)",
              f"- Data: {meta['data']}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ files and figures
def copy_stage_outputs(work: Path, out: Path, attacks: dict[str, Path]) -> None:
    """The small per-stage JSON files next to the table, so every cell can be traced to its source."""
    def copy(src: Path, dest: Path) -> None:  # with this machine's paths made relative to the repo
        dest.write_text(portable(src.read_text()))

    for d in sorted(work.glob("psi-*")) + sorted(work.glob("observer-*")) + sorted(work.glob("gan")):
        if (d / "metrics.json").exists():
            copy(d / "metrics.json", out / f"{d.name}.json")
    for d in sorted(work.glob("transform-*")):
        if not (d / "run.json").exists():  # a stage still running (or interrupted): nothing to copy yet
            continue
        dest = out / d.name
        dest.mkdir(exist_ok=True)
        copy(d / "run.json", dest / "run.json")
        for user in sorted(d.glob("user-*")):
            copy(user / "metrics.json", dest / f"{user.name}.json")
    (out / "attack").mkdir(exist_ok=True)
    for row, path in attacks.items():
        copy(path / "attack.json", out / "attack" / f"{row}.json")


def save_psnr_boxes(rows: list[str], attack_results: dict[str, dict], path: Path) -> None:
    """Fig. 7: per-image PSNR of the protected images and of the ITN-Attack's estimates, per row."""
    from pp_flower.report import save_psnr_boxplot

    boxes = {}
    for row in rows:
        if row in attack_results:
            per = attack_results[row]["per-image"]
            if "psnr-protected" in per:
                boxes[f"{row}\nprotected"] = per["psnr-protected"]
            boxes[f"{row}\nITN estimate"] = per["psnr-estimated"]
    save_psnr_boxplot(boxes, path, title="PSNR to the plain test images: protected images and ITN-Attack estimates")


@torch.no_grad()
def save_figures(out: Path, x: torch.Tensor, preset: Preset, transforms: dict[str, Path],
                 attacks: dict[str, Path]) -> None:
    """Fig. 5 (protected images per α) and Fig. 6 (plain / protected / estimated with PSNR) of test images ``x``."""
    from pp_flower.attack import attack_columns, load_inverse_net, provider_target, save_fig6
    from pp_flower.baselines import BASELINES
    from pp_flower.checkpoints import load_transform_net
    from pp_flower.metrics import psnr
    from pp_flower.report import save_pairs_grid

    alpha_rows = [row_key(a) for a in preset.alphas if row_key(a) in transforms]
    images, labels, captions = [x], ["plain"], [[]]
    for row in alpha_rows:
        protected = load_transform_net(transforms[row])[0](x)
        images.append(protected)
        labels.append(f"α = {row[5:]}")
        captions.append([f"{v:.1f} dB" for v in psnr(protected, x).tolist()])
    save_pairs_grid(images, labels, out / "fig5_alpha.png", captions,
                    title="Fig. 5: protected images x̂ = h_θ(x) per α (PSNR to the plain image)")

    columns = []
    for row, path in attacks.items():
        wire = read_json(path / "attack.json").get("wire", "float32")  # the tensor this attacker was handed
        target = provider_target(load_transform_net(transforms[row])[0] if row in transforms
                                 else BASELINES[row](BASELINE_KEYS[row]), wire)
        columns.append(attack_columns(load_inverse_net(path / "best.pt"), target, x, ROW_NAMES[row]))
    save_fig6(x, columns, out / "fig6_attack.png",
              "Fig. 6: plain / protected / ITN-Attack estimate (PSNR to the plain image)")
