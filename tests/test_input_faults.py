"""Issue 23, fault kinds 6–10: what defines a result is in every resume key; configuration text and numbers are
checked; each architecture's limits are checked before any work; checkpoints say what they are and consumers refuse
the wrong kind; a ψ at chance is called out. Every refusal is one line (PPFlowerError; the CLI exits 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pp_flower.errors import PPFlowerError
from tests.test_robustness import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
QUIET = lambda *a, **k: None  # noqa: E731


def _cli(*args, env=None, timeout=1200):
    """``ppflower ARGS`` as a user runs it (a subprocess): (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "cli.ppflower", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def _one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in error[0], (needle, error[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Two classes, 8 random 8×8 PNGs each, in train/ and test/."""
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "d", ["a", "b"], 8, 8)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tiny32") / "d", ["a", "b"], 6, 32)


def _splits(data, **kw):
    from pp_flower.data import load_splits

    return load_splits(data, **kw)


def _psi(data, out, **kw):
    from pp_flower.classifier import ClassifierConfig, train_classifier

    kw = {"epochs": 1, "batch_size": 4, **kw}
    limit = kw.pop("limit_train", None)
    return train_classifier(_splits(data, limit_train=limit), out, ClassifierConfig(**kw), log=QUIET)


# ------------------------------------------------------------------ 6. resume keys cover data and limits


def test_kind6_train_classifier_refuses_to_resume_onto_other_data_or_limits(tiny, tmp_path):
    _psi(tiny, tmp_path / "c", limit_train=6)
    with pytest.raises(PPFlowerError, match=r"n-train 6 → 10.*another --out"):
        _psi(tiny, tmp_path / "c", limit_train=10)
    other = write_image_folder(tmp_path / "other", ["a", "b"], 8, 8)  # same sizes and counts, other pixels
    for f in other.rglob("*.png"):  # make every image differ from tiny's
        from torchvision.utils import save_image

        save_image(torch.zeros(3, 8, 8), f)
    with pytest.raises(PPFlowerError, match=r"data \(another data set\)"):
        _psi(other, tmp_path / "c", limit_train=6)
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["n-train"] == 6  # nothing was overwritten


def test_kind6_the_cli_names_what_changed_in_one_line(tiny, tmp_path):
    args = ["train-classifier", "--epochs", "1", "--batch-size", "4", "--data-dir", tiny, "--out", tmp_path / "c"]
    code, _, err = _cli(*args, "--limit-train", 6)
    assert code == 0, err[-2000:]
    code, _, err = _cli(*args, "--limit-train", 10)
    assert code == 2
    _one_line_error(err, "n-train 6 → 10", "another --out")


def test_kind6_a_setting_that_does_not_change_the_result_does_not_block_a_resume(tiny, tmp_path):
    _psi(tiny, tmp_path / "c", checkpoint_every=10)
    _psi(tiny, tmp_path / "c", checkpoint_every=3)  # the same run again (resumed at its end): not refused


def test_kind6_train_gan_does_not_skip_onto_other_limits(tmp_path):
    from pp_flower.baselines.gan import GanConfig, train_gan_transform

    data = write_image_folder(tmp_path / "d", ["a", "b"], 6, 8)
    cfg = GanConfig(epochs=1, batch_size=4, unet_base=4, unet_depth=2, pos_channels=2)
    train_gan_transform(_splits(data, limit_train=6), tmp_path / "g", cfg, log=QUIET)
    with pytest.raises(PPFlowerError, match=r"n-train 6 → 10"):
        train_gan_transform(_splits(data, limit_train=10), tmp_path / "g", cfg, log=QUIET)


def test_kind6_attack_results_are_keyed_by_the_data(tmp_path):
    from pp_flower.attack import AttackConfig, train_attack

    a = write_image_folder(tmp_path / "a", ["a", "b"], 6, 8)
    b = write_image_folder(tmp_path / "b", ["a", "b"], 6, 8)
    from torchvision.utils import save_image

    for f in b.rglob("*.png"):
        save_image(torch.ones(3, 8, 8), f)
    cfg = AttackConfig(epochs=1, batch_size=4, unet_base=4, unet_depth=2)
    invert = lambda x: 1 - x  # noqa: E731
    train_attack(invert, _splits(a), tmp_path / "atk", cfg, name="t", log=QUIET, target_id="invert")
    with pytest.raises(PPFlowerError, match=r"data \(another data set\).*--force"):
        train_attack(invert, _splits(b), tmp_path / "atk", cfg, name="t", log=QUIET, target_id="invert")
    # --checkpoint-every changes no result: the cached result is reused
    train_attack(invert, _splits(a), tmp_path / "atk", AttackConfig(epochs=1, batch_size=4, unet_base=4,
                                                                     unet_depth=2, checkpoint_every=3),
                 name="t", log=QUIET, target_id="invert")


def test_kind6_reproduce_does_not_report_a_stage_done_on_another_data_set(tiny, tmp_path):
    from experiments.reproduce import PRESETS, Reproduction

    preset = PRESETS["smoke"]
    from dataclasses import replace

    preset = replace(preset, psi={"epochs": 1, "batch_size": 4}, limit_train=0, limit_eval=0)
    Reproduction(preset, tmp_path / "out", tmp_path / "work", data_dir=tiny, log=QUIET).classifier("resnet20")
    other = write_image_folder(tmp_path / "other", ["a", "b"], 7, 8)
    with pytest.raises(PPFlowerError, match=r"Stage psi-resnet20 .* other settings or data .*another --workdir"):
        Reproduction(preset, tmp_path / "out", tmp_path / "work", data_dir=other, log=QUIET).classifier("resnet20")
    # the same data: done, reused
    Reproduction(preset, tmp_path / "out", tmp_path / "work", data_dir=tiny, log=QUIET).classifier("resnet20")


# --------------------------------------------------------------- 7. configuration text, numbers, devices


@pytest.mark.parametrize("text, piece", [("epochs=2 alpha= 0.05", "alpha= 0.05"), ("epochs=2 alpha", "alpha"),
                                         ("alpha=0.01 =3", "=3"), ("epochs=2 lr 0.1", "lr 0.1")])
def test_kind7_run_config_text_that_is_not_key_value_is_refused(text, piece):
    from pp_flower.config import parse_run_config

    with pytest.raises(PPFlowerError, match="is not a key=value pair") as info:
        parse_run_config(text)
    assert repr(piece) in str(info.value) and "\n" not in str(info.value)


def test_kind7_flower_simulation_refuses_dropped_text_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "1", "--run-config",
                           f'epochs=2 alpha= 0.05 run-dir="{tmp_path / "run"}"'], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1200)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "'alpha= 0.05'", "key=value")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("values, message", [
    ({"alpha": True}, "must be a number, got true"), ({"epochs": False}, "must be a number"),
    ({"alpha": float("nan")}, "finite"), ({"alpha": float("inf")}, "finite"), ({"lr": "nan"}, "finite"),
    ({"lr": -1}, "'lr' must be > 0"), ({"epochs": 0}, "'epochs' must be ≥ 1"), ({"batch-size": 0}, "batch-size"),
    ({"unet-base": 3}, "'unet-base' must be ≥ 4"), ({"limit-train": -5}, "'limit-train' must be ≥ 0"),
    ({"provider-device": "gpu"}, "provider-device"), ({"user-device": "cuda:x"}, "user-device"),
])
def test_kind7_run_config_values_are_typed_and_range_checked(values, message):
    from pp_flower.config import AppConfig

    with pytest.raises(PPFlowerError, match=re.escape(message)):
        AppConfig.from_run_config(values)


@pytest.mark.parametrize("args, needle", [
    (["--limit-train", "-5"], "--limit-train"), (["--limit-eval", "-1"], "--limit-eval"),
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--seed", "-1"], "--seed"),
    (["--checkpoint-every", "-2"], "--checkpoint-every"), (["--label-smoothing", "nan"], "--label-smoothing"),
])
def test_kind7_cli_numbers_are_range_checked_before_any_work(tiny, tmp_path, args, needle):
    from typer.testing import CliRunner

    from cli.ppflower import app

    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["train-classifier", "--epochs", "1", "--batch-size", "4", "--data-dir",
                                      str(tiny), "--out", str(out), *args])
    text = (result.output or "") + str(result.exception or "")
    assert result.exit_code != 0 and needle in text, text
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "mps", "tpu"])
def test_kind7_device_strings_are_checked_against_the_machine_in_one_line(tiny, tmp_path, device):
    import torch

    if device in ("cuda:7",) and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    code, _, err = _cli("train-classifier", "--epochs", "1", "--data-dir", tiny, "--out", tmp_path / "c",
                        "--device", device)
    assert code == 2
    _one_line_error(err, device)


def test_kind7_provider_device_is_checked_in_preflight(tiny, tmp_path):
    from pp_flower.config import AppConfig, preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _psi(tiny, tmp_path / "c")
    cfg = AppConfig.from_run_config({"classifier": str(tmp_path / "c" / "best.pt"), "data-dir": str(tiny),
                                     "unet-depth": 2, "provider-device": "cuda", "run-dir": str(tmp_path / "run")})
    with pytest.raises(PPFlowerError, match=r"provider-device.* cuda: this machine has no such device .*cpu"):
        preflight(cfg)


def test_kind7_one_device_rule():
    """The auto-device rule is written once (pp_flower.config.resolve_device)."""
    hits = [p for package in ("pp_flower", "strategies", "sims", "runtime", "experiments", "cli")
            for p in ROOT.glob(f"{package}/**/*.py") if '"cuda" if torch.cuda.is_available()' in p.read_text()]
    assert hits == [], hits


# ---------------------------------------------------------------------- 8. each architecture's limits


def test_kind8_a_one_image_last_batch_never_reaches_batchnorm(tmp_path):
    """9 training images, batch 8, a depth-5 U-Net on 32×32 images (1×1 bottleneck): the attack trains."""
    from pp_flower.attack import AttackConfig, train_attack
    from pp_flower.training import epoch_batches
    from pp_flower.transform import steps_per_epoch

    assert steps_per_epoch(9, 8) == 1 and steps_per_epoch(10, 8) == 2 and steps_per_epoch(5, 1) == 5
    assert min(len(b) for b in epoch_batches(129, 64, 0, 0)) >= 2
    data = write_image_folder(tmp_path / "d", ["a", "b"], 10, 32)
    cfg = AttackConfig(epochs=1, batch_size=8, unet_base=4, unet_depth=5)
    result = train_attack(lambda x: 1 - x, _splits(data, limit_train=9), tmp_path / "atk", cfg, name="t", log=QUIET)
    assert result["n-train"] == 9


def test_kind8_the_flower_app_and_its_reference_drop_the_same_one_image_batch(tiny32):
    """The split protocol's batches come from steps_per_epoch and train_batch on both paths; the in-process
    reference on 9 images, batch 8, depth 5 trains (a 1-image batch would raise in BatchNorm)."""
    from pp_flower.config import AppConfig
    from pp_flower.data import load_datasets
    from pp_flower.features import load_feature_net
    from pp_flower.reference import train_in_process

    train, _ = load_datasets(tiny32)
    cfg = AppConfig(unet_base=4, unet_depth=5, batch_size=8, epochs=1)
    psi = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    _, losses = train_in_process(cfg, psi, load_feature_net(None, 9), train.images, train.labels,
                                 torch.arange(9))
    assert len(losses) == 1


def test_kind8_vgg16_on_16x16_images_is_refused_before_any_work(tmp_path):
    data = write_image_folder(tmp_path / "d", ["a", "b"], 4, 16)
    with pytest.raises(PPFlowerError, match=r"16×16.*VGG16-BN.*at least 32"):
        _psi(data, tmp_path / "c", arch="vgg16")
    assert not (tmp_path / "c").exists()


def test_kind8_tanaka_on_30x30_images_is_refused_before_any_work(tmp_path):
    data = write_image_folder(tmp_path / "d", ["a", "b"], 10, 30)
    with pytest.raises(PPFlowerError, match=r"30×30.*Tanaka.*divisible by 4"):
        _psi(data, tmp_path / "c", baseline="tanaka", key=1)
    code, _, err = _cli("attack", "--baseline", "tanaka", "--key", 1, "--data-dir", data, "--unet-depth", 1,
                        "--epochs", 1, "--out", tmp_path / "atk")
    assert code == 2
    _one_line_error(err, "Tanaka", "30×30")


def test_kind8_the_gan_on_non_square_images_is_refused(tmp_path):
    from torchvision.utils import save_image

    from pp_flower.baselines.gan import GanConfig, train_gan_transform

    data = tmp_path / "d"
    for part in ("train", "test"):
        for c in ("a", "b"):
            (data / part / c).mkdir(parents=True)
            for i in range(4):
                save_image(torch.rand(3, 16, 8), data / part / c / f"{i}.png")
    with pytest.raises(PPFlowerError, match=r"16×8.*square"):
        train_gan_transform(_splits(data), tmp_path / "g", GanConfig(epochs=1, unet_base=4, unet_depth=2), log=QUIET)


def test_kind8_a_batch_of_one_at_a_1x1_bottleneck_is_refused(tmp_path):
    from pp_flower.attack import AttackConfig, train_attack

    data = write_image_folder(tmp_path / "d", ["a", "b"], 4, 32)
    with pytest.raises(PPFlowerError, match=r"batch size 1 .* at least 2"):
        train_attack(lambda x: 1 - x, _splits(data), tmp_path / "atk",
                     AttackConfig(epochs=1, batch_size=1, unet_base=4, unet_depth=5), name="t", log=QUIET)


# ------------------------------------------------------------- 9. checkpoints say what they are for


def test_kind9_files_that_are_not_checkpoints_are_refused_in_one_line(tmp_path):
    import zipfile

    from pp_flower.checkpoints import load_classifier, load_transform_net

    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    archive = tmp_path / "other.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hello")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    for path in (text, noise, empty, archive, plain, tmp_path):
        for load in (load_classifier, load_transform_net):
            with pytest.raises(PPFlowerError) as info:
                load(path)
            message = str(info.value)
            assert str(path) in message and "\n" not in message and "weights_only" not in message, message
            assert "is needed here" in message, message


def test_kind9_a_checkpoint_of_the_wrong_kind_is_named(tiny, tmp_path):
    from pp_flower.checkpoints import load_classifier, load_transform_net, save_atomic, transform_blob
    from pp_flower.models import UNet

    _psi(tiny, tmp_path / "c")
    save_atomic(transform_blob(UNet(4, 2), (8, 8)), tmp_path / "h.pt")
    with pytest.raises(PPFlowerError, match=r"holds a classifier ψ trained on plain images, but a transformation"):
        load_transform_net(tmp_path / "c" / "best.pt")
    with pytest.raises(PPFlowerError, match=r"holds a transformation network h_θ, but a classifier ψ"):
        load_classifier(tmp_path / "h.pt")


def test_kind9_a_baseline_psi_is_refused_where_psi_must_take_plain_images(tiny, tmp_path):
    from pp_flower.config import AppConfig, preflight
    from pp_flower.evaluation import classify_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((tiny / "test" / "a").iterdir())[:2]:
        (photos / f.name).write_bytes(f.read_bytes())
    for baseline in ("tanaka", "pixel"):
        _psi(tiny, tmp_path / baseline, baseline=baseline, key=1)
        psi = tmp_path / baseline / "best.pt"
        with pytest.raises(PPFlowerError, match=r"trained on .*--baseline " + baseline + r".*plain images"):
            classify_folder(psi, photos)
        cfg = AppConfig.from_run_config({"classifier": str(psi), "data-dir": str(tiny), "unet-depth": 2,
                                         "run-dir": str(tmp_path / "run")})
        with pytest.raises(PPFlowerError, match=r"--baseline " + baseline + r".*h_θ training"):
            preflight(cfg)


def test_kind9_protect_and_classify_refuse_images_of_another_size(tiny, tmp_path):
    from torchvision.utils import save_image

    from pp_flower.checkpoints import save_atomic, transform_blob
    from pp_flower.evaluation import classify_folder, protect_folder
    from pp_flower.models import UNet

    big = tmp_path / "big"
    big.mkdir()
    save_image(torch.rand(3, 64, 64), big / "x.png")
    save_atomic(transform_blob(UNet(4, 2), (32, 32)), tmp_path / "h32.pt")
    with pytest.raises(PPFlowerError, match=r"trained on 32×32 images; refused: x.png \(64×64\)"):
        protect_folder(tmp_path / "h32.pt", big, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _psi(tiny, tmp_path / "c")  # a ψ of 8×8 images
    with pytest.raises(PPFlowerError, match=r"trained on 8×8 images; refused: x.png \(64×64\)"):
        classify_folder(tmp_path / "c" / "best.pt", big)
    # a checkpoint from before the size field: accepted as trained at the size it is used at (documented)
    blob = transform_blob(UNet(4, 2))
    assert "image-size" not in blob
    save_atomic(blob, tmp_path / "old.pt")
    assert protect_folder(tmp_path / "old.pt", big, tmp_path / "out") == 1


# --------------------------------------------------------------------------- 10. a ψ at chance is loud


def test_kind10_a_psi_at_chance_is_reported_by_train_classifier_and_the_provider(tiny, tmp_path, caplog):
    import logging

    from pp_flower.classifier import ClassifierConfig, chance_line, train_classifier
    from pp_flower.config import AppConfig
    from strategies.provider import ProviderStrategy

    assert chance_line(0.101, 10, 5000) and not chance_line(0.2, 10, 5000) and chance_line(0.14, 10, 200)
    lines = []
    metrics = train_classifier(_splits(tiny), tmp_path / "c", ClassifierConfig(epochs=1, batch_size=4, lr=1e-9),
                               log=lines.append)  # random images, lr ~0: chance
    assert metrics["at-chance"] is True
    assert any("chance level" in str(line) for line in lines)
    cfg = AppConfig.from_run_config({"classifier": str(tmp_path / "c" / "best.pt"), "data-dir": str(tiny),
                                     "unet-depth": 2})
    with caplog.at_level(logging.WARNING, logger="pp_flower.provider"):
        ProviderStrategy.from_config(cfg)
    assert any("chance level" in r.getMessage() for r in caplog.records)


def test_kind10_every_readme_training_example_learns_or_says_it_is_a_smoke_test():
    """A README command whose budget cannot get ψ off chance (1 epoch on a few thousand images) is labelled a smoke
    test on its line."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"train-classifier .*--epochs (\d+)", line)
            if m and int(m.group(1)) <= 2 and "--limit-train" in line:
                assert "smoke test" in line, line


# ------------------------------------------------------------------------------------------ smaller items


def test_the_out_of_memory_hint_names_a_value_the_config_accepts():
    from pp_flower.config import AppConfig

    text = (ROOT / "pp_flower" / "user.py").read_text()
    hints = re.findall(r'set keep-graph=\\?"?(\w+)', text)
    assert hints, "the out-of-memory hint names keep-graph"
    for value in hints:
        AppConfig.from_run_config({"keep-graph": value})


def test_two_targets_named_alike_are_both_attacked(tmp_path):
    from pp_flower.attack import AttackConfig
    from pp_flower.checkpoints import save_atomic, transform_blob
    from pp_flower.evaluation import attack_targets
    from pp_flower.models import UNet

    data = write_image_folder(tmp_path / "d", ["a", "b"], 6, 8)
    for run, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_atomic(transform_blob(UNet(4, 2), (8, 8)), tmp_path / run / "user-0" / "best.pt")
    summary = attack_targets(transform=tmp_path / "a" / "user-0" / "best.pt", run_dir=tmp_path / "b",
                             out=tmp_path / "atk", cfg=AttackConfig(epochs=1, batch_size=4, unet_base=4, unet_depth=2),
                             data_dir=data, log=QUIET)
    assert set(summary) == {"a-user-0-ITN", "b-user-0-ITN"}


def test_a_six_channel_target_says_n_a_not_nan(tmp_path):
    from pp_flower.attack import AttackConfig, train_attack
    from pp_flower.baselines import TanakaEncryption

    data = write_image_folder(tmp_path / "d", ["a", "b"], 6, 8)
    lines = []
    train_attack(TanakaEncryption(1), _splits(data), tmp_path / "atk", AttackConfig(epochs=1, batch_size=4, unet_base=4,
                                                                                     unet_depth=2),
                 name="tanaka", log=lambda line: lines.append(str(line)))
    last = lines[-1]
    assert "n/a (6 channels)" in last and "nan" not in last and "SSIM ∈ [−1, 1]" in last
