"""The user journey and audits as functions behind the CLI: attack targets, protect a folder, classify a folder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from pp_flower.checkpoints import ensure_writable_dir, load_classifier, load_transform_net
from pp_flower.data import accepted_extensions, describe_others, image_files, read_image
from pp_flower.errors import PPFlowerError
from pp_flower.models import check_image_size
from pp_flower.progress import track


def _images_and_others(folder: Path) -> tuple[list[Path], list[str]]:
    """The images of ``folder`` (listed as a data set's class folder is) and the other visible entries' names."""
    folder = Path(folder)
    if not folder.exists():
        raise PPFlowerError(f"Image folder {folder} does not exist.")
    if not folder.is_dir():
        raise PPFlowerError(f"{folder} is a file, not a folder: put the images in a folder and give that.")
    files, others = image_files(folder)
    if not files:
        raise PPFlowerError(f"{folder} holds no PNG or JPEG images, nor any other accepted kind"
                            f"{describe_others(others)}; accepted: {accepted_extensions()} (any case; hidden files are "
                            "ignored, subfolders are not searched).")
    return files, others


def _images_in(folder: Path) -> list[Path]:
    return _images_and_others(folder)[0]


def _read(path: Path) -> torch.Tensor:
    return read_image(path).float().div(255)


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: dict[str, Path], what_out: str) -> None:
    """An output never replaces an input: refuse, before anything is written, an output path that is an input file
    (however it is spelled: relative, through a symlink, a hard link). ``inputs``: the option naming it → path;
    ``what_out``: the option naming the outputs' place."""
    existing = {}
    for what, path in inputs.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        existing[(st.st_dev, st.st_ino)] = (what, path)
    for out in outputs:
        try:
            st = os.stat(out)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in existing:
            what, path = existing[(st.st_dev, st.st_ino)]
            raise PPFlowerError(f"{what_out}: writing {out} would overwrite the input {what} ({path}); choose "
                                f"another {what_out}. Nothing was written.")


def protected_names(files: list[Path]) -> dict[Path, str]:
    """Each input image → its output name (``<stem>.png``); names that would coincide are refused, also when they
    differ only in case (one file on macOS' and Windows' file systems)."""
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f"{f.stem}.png".casefold(), []).append(f)
    clashes = [group for group in by_name.values() if len(group) > 1]
    if clashes:
        shown = "; ".join(f"{' and '.join(f.name for f in group)} → {group[0].stem}.png" for group in clashes[:5])
        raise PPFlowerError(f"Input images would be written under one name: {shown}{' …' if len(clashes) > 5 else ''}. "
                            "Rename all but one of each. Nothing was written.")
    return {f: f"{f.stem}.png" for f in files}


def protect_folder(transform: Path, input_dir: Path, output_dir: Path, device: str = "cpu", log=None) -> int:
    """Write h_θ(x) as PNG for every image in ``input_dir`` and return how many were written.

    Refused before anything is written: images h_θ cannot take, two inputs with one output name, and an output
    folder that is the input folder (or would replace any input file). Each PNG is written atomically."""
    from torchvision.utils import save_image

    transform, input_dir, output_dir = Path(transform), Path(input_dir), Path(output_dir)
    files, others = _images_and_others(input_dir)
    if output_dir.exists() and os.path.samefile(output_dir, input_dir):
        raise PPFlowerError(f"The output folder {output_dir} is the input folder {input_dir}: the protected images "
                            "would replace or mix with the plain ones. Choose another output folder. Nothing was "
                            "written.")
    names = protected_names(files)
    refuse_overwriting_inputs([output_dir / n for n in names.values()],
                              {"--transform": transform, **{f"image {f.name}": f for f in files}}, "output folder")
    net, blob = load_transform_net(transform)
    net = net.to(device).eval()
    multiple = 2**net.depth
    images = [(f, _read(f)) for f in files]
    bad = [f"{f.name} ({x.shape[2]}×{x.shape[1]})" for f, x in images if x.shape[1] % multiple or x.shape[2] % multiple]
    if bad:
        raise PPFlowerError(f"h_θ (U-Net depth {net.depth}) needs width and height divisible by {multiple}; "
                            f"refused: {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}. Nothing was written.")
    _refuse_other_sizes(blob, transform, images)
    output_dir = ensure_writable_dir(output_dir, "The output folder")
    written = 0
    with torch.no_grad():
        for f, x in track(images, "Protecting"):
            target = output_dir / names[f]
            tmp = output_dir / f".{names[f]}.tmp{os.getpid()}"
            save_image(net(x[None].to(device))[0].cpu(), tmp, format="png")
            os.replace(tmp, target)  # replaces the directory entry: never writes through a link into another file
            written += 1
    if log is not None and others:
        log(f"skipped {len(others)} entr{'y' if len(others) == 1 else 'ies'} of {input_dir} that "
            f"{'is' if len(others) == 1 else 'are'} not an image: "
            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}")
    return written


def classify_folder(classifier: Path, input_dir: Path, device: str = "cpu") -> list[tuple[str, str]]:
    """ψ's predicted class for every (protected) image in ``input_dir``."""
    from pp_flower.data import CIFAR10_CLASSES

    from pp_flower.checkpoints import require_plain_classifier

    model, blob = load_classifier(classifier)
    require_plain_classifier(blob, classifier, "`ppflower classify` (3-channel images from `ppflower protect`)",
                             allow_gan=True)
    model = model.to(device)
    classes = blob.get("classes") or list(CIFAR10_CLASSES)
    images = [(f, _read(f)) for f in _images_in(input_dir)]
    _refuse_other_sizes(blob, classifier, images)
    out = []
    with torch.no_grad():
        for f, x in track(images, "Classifying"):
            out.append((f.name, classes[model(x[None].to(device)).argmax(1).item()]))
    return out


def _refuse_other_sizes(blob: dict, path: Path, images: list[tuple[Path, torch.Tensor]]) -> None:
    """Images of another size than the checkpoint was trained at are refused, all named, before any work
    (a checkpoint without a recorded size: see pp_flower.checkpoints.check_image_size_matches)."""
    from pp_flower.checkpoints import describe, image_size_of

    trained = image_size_of(blob)
    wrong = [f"{f.name} ({x.shape[-1]}×{x.shape[-2]})" for f, x in images
             if trained is not None and tuple(x.shape[-2:]) != trained]
    if wrong:
        raise PPFlowerError(f"{path} holds {describe(blob)} trained on {trained[1]}×{trained[0]} images; refused: "
                            f"{', '.join(wrong[:10])}{' …' if len(wrong) > 10 else ''} — resize them to "
                            f"{trained[1]}×{trained[0]}. Nothing was written.")


def wire_of_run(run_dir: str | os.PathLike) -> str | None:
    """The wire a finished run's users sent x̂ over: ``config.wire`` of ``RUN_DIR/run.json``; ``float32`` for a
    run.json from before wires were recorded (x̂ travelled as float32 then); None without a run.json."""
    summary = Path(run_dir) / "run.json"
    if not summary.is_file():
        return None
    try:
        config = json.loads(summary.read_text())["config"]
        wire = config.get("wire", "float32")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PPFlowerError(f"Cannot read {summary} (not a run summary: {exc!r}).") from None
    if wire not in ("uint8", "float32"):
        raise PPFlowerError(f"{summary} names wire {wire!r}, which is neither uint8 nor float32.")
    return wire


def attack_targets(transform=None, run_dir=None, out=None, cfg=None, strong=False, perceptual_weight=1e-4,
                   data_dir=None, limit_train=None, limit_eval=None, device="cpu", log=print,
                   baseline: str | None = None, key: int = 0, force: bool = False, *, wire: str | None = None,
                   restorer=None, observer: str | os.PathLike | None = None,
                   vgg_weights: str | os.PathLike | None = None) -> dict:
    """Attack every target (one checkpoint, or every user of a run); box plot and summary over every attack
    in ``out`` (this call's and earlier ones'), each cached under the hash of its target and its settings.

    What is attacked is what the provider received (issue #22): h_θ's x̂ through ``wire`` —
    ``pp_flower.wire.provider_view`` — where ``wire`` defaults to the run's own (:func:`wire_of_run` of
    ``run_dir``, or of the run holding ``transform``; ``pp_flower.wire.DEFAULT`` for a checkpoint outside a run;
    a ``wire`` other than the run's is refused). Baselines' encryptions are 8-bit images: ``uint8``.

    Attackers per target (folder ``out/<target>-<attacker>``):
      ``ITN`` (``cfg``, the paper's); with ``strong``: ``ITN+feat`` (``cfg`` + ``perceptual_weight``) and the
      restorer (``restorer``, default :func:`pp_flower.attack.restorer_config` of ``cfg``; named ``restorer``, or
      ``restorer+GAN`` with an adversarial term); a ``restorer`` given without ``strong`` is added too. Under the
      ``float32`` wire each h_θ also gets ``ITN-logit`` (and ``restorer-logit`` with the restorer): the same
      attackers handed logit(x̂), h_θ's pre-sigmoid output.
    ``observer``: a classifier checkpoint trained on plain images; its accuracy on the protected images and on
    each attacker's estimates is reported (None: not measured). ``vgg_weights``: φ's weights for attackers with a
    feature term (None: :func:`pp_flower.features.load_feature_net`'s default).

    Writes ``out/summary.json`` = {"targets": :func:`pp_flower.attack.summarise_attacks` (per target: its wire,
    every attacker's median PSNR/SSIM and observer accuracy, ``best`` by each), "attacks": per folder as
    returned} and ``out/fig7_psnr_boxplot.png``. Returns the per-folder table: tag → median/quartile PSNR and
    SSIM of estimates and protected images, ``wire``, ``input``, ``attacker``, ``target-name`` and
    ``observer-accuracy`` (None without an observer).
    """
    from dataclasses import replace

    from pp_flower import wire as wires
    from pp_flower.attack import (AttackConfig, provider_target, read_attack_results, restorer_config,
                                  summarise_attacks, target_fingerprint, train_attack)
    from pp_flower.data import load_splits
    from pp_flower.report import save_psnr_boxplot

    cfg = cfg or AttackConfig()
    if wire is not None and wire not in wires.WIRES:
        raise PPFlowerError(f"--wire must be one of {', '.join(wires.WIRES)}, got {wire!r}.")
    targets: dict[str, Path] = {}
    if transform is not None:
        targets[Path(transform).parent.name or "transform"] = Path(transform)
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise PPFlowerError(f"Run directory {run_dir} does not exist.")
        users = sorted(run_dir.glob("user-*/best.pt"))
        if not users:
            raise PPFlowerError(f"{run_dir} holds no user-*/best.pt; is it a finished `flower-simulation` run dir?")
        for p in users:  # --transform a/user-0/best.pt --run-dir b: both are user-0; each keeps its own results
            name = p.parent.name
            if name in targets and targets[name].resolve() != p.resolve():
                first = targets.pop(name)
                targets[f"{first.parent.parent.name or 'transform'}-{name}"] = first
                name = f"{run_dir.name}-{name}"
            if name in targets and targets[name].resolve() != p.resolve():
                raise PPFlowerError(f"Two attack targets are both named '{name}' ({targets[name]} and {p}); attack "
                                    "them in two calls with different --out.")
            targets[name] = p
    loaded = {name: load_transform_net(path) for name, path in targets.items()}  # wrong kinds fail here, early
    target_wires = {}
    for name, path in targets.items():
        # the run's summary, else the checkpoint's own record (users write it; a killed run has no run.json yet)
        recorded = wire_of_run(path.parent.parent) or loaded[name][1].get("wire")
        if wire is not None and recorded is not None and wire != recorded:
            raise PPFlowerError(f"--wire {wire}: {path} sent x̂ over the {recorded} wire (its run.json or "
                                "checkpoint); the attack must see what the provider received.")
        if wire is None and recorded is None and log is not None:
            log(f"{path} records no wire (a checkpoint from before wires): attacked as {wires.DEFAULT}; "
                "pass --wire float32 if its run sent float32 x̂.")
        target_wires[name] = wire or recorded or wires.DEFAULT
    callables, ids = {}, {name: target_fingerprint(path) for name, path in targets.items()}
    if baseline is not None:
        from pp_flower.baselines import BASELINES

        if baseline not in BASELINES:
            raise PPFlowerError(f"Unknown baseline '{baseline}' (known: {', '.join(BASELINES)}).")
        callables[f"{baseline}-key{key}"] = BASELINES[baseline](key)
        ids[f"{baseline}-key{key}"] = f"baseline:{baseline}:key={key}"
    if not targets and not callables:
        raise PPFlowerError("Nothing to attack: give --transform PATH, --run-dir PATH or --baseline NAME --key K.")
    observed = None
    if observer is not None:
        from pp_flower.checkpoints import require_plain_classifier

        observer_net, observer_blob = load_classifier(observer)
        require_plain_classifier(observer_blob, observer, "the attack's observer")
        observed = (observer_net, target_fingerprint(observer))
    nets = {name: net for name, (net, _) in loaded.items()}
    out = ensure_writable_dir(Path(out) if out else (Path(run_dir) / "attack" if run_dir else Path("runs/attack")),
                              "--out")
    splits = load_splits(data_dir, limit_train=limit_train, limit_eval=limit_eval)
    size = tuple(splits.train.images.shape[-2:])
    check_image_size(size, cfg.unet_depth, "The images (for the attacker's U-Net, --unet-depth)")
    from pp_flower.checkpoints import check_image_size_matches

    for name, (net, blob) in loaded.items():
        check_image_size(size, net.depth, f"The images (for h_θ {name})")
        check_image_size_matches(blob, size, targets[name], "the data set's images")
    if baseline == "tanaka":
        from pp_flower.baselines.tanaka import check_block_size

        check_block_size(size)
    attackers = {"ITN": cfg}
    if strong:
        attackers["ITN+feat"] = replace(cfg, perceptual=perceptual_weight)
    if strong or restorer is not None:
        rcfg = restorer if restorer is not None else restorer_config(cfg)
        attackers["restorer+GAN" if rcfg.adversarial > 0 else "restorer"] = rcfg
    jobs = []  # (target name, attacker, target, settings)
    for name, net in nets.items():
        for attacker, acfg in attackers.items():
            jobs.append((name, attacker, provider_target(net, target_wires[name], "image", device), acfg))
        if target_wires[name] == "float32":
            for attacker, acfg in attackers.items():
                if attacker in ("ITN", "restorer", "restorer+GAN"):
                    jobs.append((name, f"{attacker}-logit", provider_target(net, "float32", "logit", device), acfg))
    for name, fn in callables.items():
        jobs += [(name, attacker, provider_target(fn, "uint8"), acfg) for attacker, acfg in attackers.items()]
    for name, attacker, target, acfg in jobs:
        train_attack(target, splits, out / f"{name}-{attacker}", acfg, device, name=f"{name} ({attacker})", log=log,
                     target_id=ids[name], force=force, observer=observed, attacker=attacker, target_name=name,
                     vgg_weights=vgg_weights)
    results = read_attack_results(out)  # every attack in out, not just this call's
    boxes = {}
    for r in results.values():
        name, attacker = r["target-name"], r["attacker"]
        if attacker == "ITN" and "psnr-protected" in r["per-image"]:
            boxes[f"{name}\nprotected"] = r["per-image"]["psnr-protected"]
        boxes[f"{name}\n{attacker} estimate"] = r["per-image"]["psnr-estimated"]
    save_psnr_boxplot(boxes, out / "fig7_psnr_boxplot.png",
                      title="PSNR to the plain test images (higher = more leaked)")
    summary = {tag: {**{k: r[k] for k in ("psnr-estimated", "psnr-protected", "ssim-estimated", "ssim-protected")
                        if k in r},
                     **{k: r.get(k) for k in ("wire", "input", "attacker", "target-name")},
                     "observer-accuracy": r.get("recognisability-estimated")} for tag, r in results.items()}
    per_target = summarise_attacks(results)
    (out / "summary.json").write_text(json.dumps({"targets": per_target, "attacks": summary}, indent=2))
    broken = [tag for tag, r in summary.items() if not math.isfinite(r["psnr-estimated"]["median"])]
    if broken:
        raise PPFlowerError(f"The attack on {', '.join(broken)} produced NaN metrics; see {out}.")
    for name, entry in per_target.items():
        best = entry["best"]
        line = f"{name} ({entry['wire']} wire): strongest by median PSNR {best['psnr-median']['attacker']} " \
               f"{best['psnr-median']['value']:.2f} dB, by median SSIM {best['ssim-median']['attacker']} " \
               f"{best['ssim-median']['value']:.3f}"
        if best["observer-accuracy"] is not None:
            line += (f", by the observer's accuracy {best['observer-accuracy']['attacker']} "
                     f"{best['observer-accuracy']['value']:.1%}")
        log(line)
    log(f"attack results → {out}/summary.json, box plot → {out}/fig7_psnr_boxplot.png")
    return summary


def label_inference(run_dir: str | os.PathLike, data_dir=None, out: str | os.PathLike | None = None,
                    log=None) -> list[dict]:
    """What each user of a finished run infers of the provider's labels from the ∂L_class/∂x̂ it received.

    Reads ``RUN_DIR/user-K/label-probe.pt`` (the gradients a user kept, run-config ``probe-images``), runs Li et
    al. 2022's attacks (pp_flower.label_leakage) and scores them with the data set's labels — the labels only score
    the guesses (and give the 10 per class the known-labels attack assumes). Writes ``OUT/labels.json`` (default
    ``RUN_DIR/attack``) and returns one report per user (``user`` = its index). Raises PPFlowerError when the run
    kept no probe (probe-images=0, or a run from before probes)."""
    from pp_flower.data import load_datasets
    from pp_flower.label_leakage import LabelProbe, format_table

    run_dir = Path(run_dir)
    probes = sorted(run_dir.glob("user-*/label-probe.pt"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not probes:
        raise PPFlowerError(f"{run_dir} holds no user-K/label-probe.pt: the run kept no received gradients "
                            "(run-config probe-images=0, or a run made before label probes).")
    if data_dir is None and (run_dir / "run.json").is_file():  # the data the run trained on, unless told otherwise
        try:
            data_dir = json.loads((run_dir / "run.json").read_text())["config"].get("data-dir") or None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise PPFlowerError(f"Cannot read {run_dir / 'run.json'} (not a run summary).") from None
    labels = load_datasets(data_dir)[0].labels
    n_classes = int(labels.max()) + 1
    reports = []
    for path in probes:
        try:
            probe = LabelProbe.load(path)
            if len(probe) and int(probe.ids().max()) >= len(labels):
                raise ValueError(f"it holds sample id {int(probe.ids().max())}, but the data set has "
                                 f"{len(labels)} training images: not the run's data (pass its --data-dir)")
            report = probe.report(labels, n_classes)
        except ValueError as exc:  # not a probe, other data, or too few images: one line naming the file
            raise PPFlowerError(f"{path}: {exc}") from None
        reports.append({"user": int(path.parent.name.split("-")[1]), **report})
    out = Path(out) if out is not None else run_dir / "attack"
    ensure_writable_dir(out, "label-inference output")
    (out / "labels.json").write_text(json.dumps({"run-dir": str(run_dir), "users": reports}, indent=2))
    if log is not None:
        log(format_table(reports))
        log(f"Label inference → {out / 'labels.json'}")
    return reports
