"""The ITN-Attack really learns, cannot beat ignorance, and its metrics mean what they say."""

import json
import statistics
import subprocess
import sys

import pytest
import torch

from pp_flower.attack import AttackConfig, train_attack
from pp_flower.data import load_splits, to_float
from pp_flower.metrics import psnr, ssim


@pytest.fixture(scope="module")
def small(data_dir):
    return load_splits(data_dir, limit_train=1024, limit_eval=256)


def test_psnr_matches_its_definition():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE 0.01 on [0, 1] images → 10·log10(1/0.01) = 20 dB
    assert psnr(y, x).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    assert psnr(x + torch.sqrt(torch.tensor(0.001)), x)[0].item() == pytest.approx(30.0, abs=1e-3)
    z = torch.rand(2, 3, 16, 16)
    assert ssim(z, z).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_attack_inverts_an_invertible_target(small, tmp_path):
    cfg = AttackConfig(epochs=12, batch_size=64, lr=0.5, unet_base=16, unet_depth=2)
    result = train_attack(lambda x: 1 - x, small, tmp_path, cfg, name="1-x", log=lambda *a: None)
    assert result["psnr-estimated"]["median"] > 25.0          # held-out test images come back
    assert result["psnr-protected"]["median"] < 10.0
    assert len(result["per-image"]["psnr-estimated"]) == 256
    assert (tmp_path / "fig6.png").stat().st_size > 1000 and (tmp_path / "best.pt").exists()


def test_attack_cannot_beat_the_best_constant_guess(small, tmp_path):
    cfg = AttackConfig(epochs=3, batch_size=64, lr=0.5, unet_base=8, unet_depth=2)
    constant = lambda x: torch.full_like(x, 0.5)  # noqa: E731 - output ignores x
    result = train_attack(constant, small, tmp_path, cfg, name="constant", log=lambda *a: None)
    mean_image = to_float(small.train.images).mean(0, keepdim=True)
    x_test = to_float(small.test.images)
    best_guess = psnr(mean_image.expand_as(x_test), x_test).mean().item()
    assert result["psnr-estimated"]["mean"] <= best_guess + 0.5


def test_killed_attack_resumes_to_the_same_estimator(small, tmp_path):
    cfg = AttackConfig(epochs=2, batch_size=128, lr=0.5, unet_base=4, unet_depth=2, checkpoint_every=2)
    full = train_attack(lambda x: 1 - x, small, tmp_path / "full", cfg, log=lambda *a: None)

    calls = {"n": 0}

    def dying_target(x):
        calls["n"] += 1
        if calls["n"] == 13:  # mid-way through epoch 2 (8 steps per epoch): the process "dies"
            raise KeyboardInterrupt
        return 1 - x

    with pytest.raises(KeyboardInterrupt):
        train_attack(dying_target, small, tmp_path / "killed", cfg, log=lambda *a: None)
    assert not (tmp_path / "killed" / "attack.json").exists()
    messages = []
    resumed = train_attack(lambda x: 1 - x, small, tmp_path / "killed", cfg, log=messages.append)
    assert any("Resuming" in m for m in messages)
    assert resumed["per-image"]["psnr-estimated"] == pytest.approx(full["per-image"]["psnr-estimated"], abs=1e-4)


def _ppflower(*args):
    return subprocess.run([sys.executable, "-m", "sims.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_attack_run_dir_measures_each_users_h_theta_and_caches_by_target(two_user_run, tmp_path, data_dir):
    from pp_flower.checkpoints import load_transform_net

    _, run_dir = two_user_run
    out = tmp_path / "attack"
    common = ["--run-dir", run_dir, "--out", out, "--epochs", 1, "--unet-depth", 2, "--limit-train", 256,
              "--limit-eval", 64, "--batch-size", 64]
    proc = _ppflower("attack", *common, "--unet-base", 4, "--strong")
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = to_float(load_splits(data_dir, limit_train=256, limit_eval=64).test.images)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"user-0-ITN", "user-0-ITN+feat", "user-1-ITN", "user-1-ITN+feat"}
    for user in ("user-0", "user-1"):
        net, _ = load_transform_net(run_dir / user / "best.pt")
        with torch.no_grad():
            expected = psnr(net(x).clamp(0, 1), x)
        for attacker in ("ITN", "ITN+feat"):
            result = json.loads((out / f"{user}-{attacker}" / "attack.json").read_text())
            # the protected images measured are exactly this user's h_θ(x) on the 64 test images
            assert result["per-image"]["psnr-protected"] == pytest.approx(expected.tolist(), abs=1e-3)
            assert result["psnr-estimated"]["median"] == pytest.approx(
                statistics.median(result["per-image"]["psnr-estimated"]), abs=1e-6)
            assert summary[f"{user}-{attacker}"]["psnr-estimated"] == result["psnr-estimated"]
        assert result["config"]["perceptual"] > 0 and (out / f"{user}-ITN" / "fig6.png").stat().st_size > 1000
    assert (out / "fig7_psnr_boxplot.png").stat().st_size > 1000

    before = (out / "user-0-ITN" / "attack.json").read_text()
    same = _ppflower("attack", *common, "--unet-base", 4)
    assert same.returncode == 0 and "up to date" in same.stdout
    other = _ppflower("attack", *common, "--unet-base", 8)  # other settings: never the old numbers
    assert other.returncode == 2 and "--force" in other.stderr and "attack" in other.stderr
    assert (out / "user-0-ITN" / "attack.json").read_text() == before
    forced = _ppflower("attack", *common, "--unet-base", 8, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((out / "user-0-ITN" / "attack.json").read_text())["config"]["unet_base"] == 8
    assert set(json.loads((out / "summary.json").read_text())) == set(summary)  # earlier attacks stay listed


def test_attack_cache_is_keyed_by_the_target(small, tmp_path):
    """Another target in the same directory (another h_θ) is refused, not answered with the old numbers."""
    from pp_flower.errors import PPFlowerError

    cfg = AttackConfig(epochs=1, batch_size=128, unet_base=4, unet_depth=2)
    first = train_attack(lambda x: 1 - x, small, tmp_path, cfg, log=lambda *a: None, target_id="sha256:aaa")
    assert train_attack(lambda x: 1 - x, small, tmp_path, cfg, log=lambda *a: None, target_id="sha256:aaa") == first
    def nearly_plain(x):
        return (x + 0.02).clamp(0, 1)

    with pytest.raises(PPFlowerError, match=r"differs in: target.*--force"):
        train_attack(nearly_plain, small, tmp_path, cfg, log=lambda *a: None, target_id="sha256:bbb")
    second = train_attack(nearly_plain, small, tmp_path, cfg, log=lambda *a: None, target_id="sha256:bbb", force=True)
    assert second["cache-key"]["target"] == "sha256:bbb"
    assert first["psnr-protected"]["median"] < 15 < 30 < second["psnr-protected"]["median"]  # the new target's numbers


def test_bad_attack_inputs_are_clear_errors(tmp_path, classifier_ckpt):
    proc = _ppflower("attack", "--transform", classifier_ckpt, "--epochs", 1)
    assert proc.returncode == 2 and "holds a classifier ψ trained on plain images, but a transformation" in proc.stderr
    proc = _ppflower("attack", "--run-dir", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_protect_then_classify_from_the_command_line(two_user_run, tmp_path, splits, classifier_ckpt):
    from torchvision.utils import save_image

    _, run_dir = two_user_run
    plain, protected = tmp_path / "plain", tmp_path / "protected"
    plain.mkdir()
    for i in range(3):
        save_image(to_float(splits.test.images[i]), plain / f"img{i}.png")
    proc = _ppflower("protect", "--transform", run_dir / "user-0" / "best.pt", plain, protected)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in protected.iterdir()) == ["img0.png", "img1.png", "img2.png"]
    from pp_flower.checkpoints import load_classifier, load_transform_net
    from pp_flower.data import read_image

    net, _ = load_transform_net(run_dir / "user-0" / "best.pt")
    psi, _ = load_classifier(classifier_ckpt)
    expected_labels = []
    for i in range(3):
        with torch.no_grad():
            xhat = net(read_image(plain / f"img{i}.png")[None].float() / 255)[0]
        written = read_image(protected / f"img{i}.png")
        # the PNG is h_θ(x), rounded to 8 bits as torchvision's save_image rounds
        assert (written.int() - xhat.mul(255).add(0.5).clamp(0, 255).floor().int()).abs().max() <= 1
        with torch.no_grad():
            expected_labels.append(splits.train_all.classes[psi(written[None].float() / 255).argmax(1).item()])
    proc = _ppflower("classify", "--classifier", classifier_ckpt, protected)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines == [[f"img{i}.png", expected_labels[i]] for i in range(3)]  # ψ's own predictions
    # bad input: an empty folder and an image h_θ cannot take
    (tmp_path / "empty").mkdir()
    proc = _ppflower("protect", "--transform", run_dir / "user-0" / "best.pt", tmp_path / "empty", tmp_path / "o")
    assert proc.returncode == 2 and "no PNG or JPEG" in proc.stderr
    save_image(torch.rand(3, 30, 30), plain / "odd.png")
    proc = _ppflower("protect", "--transform", run_dir / "user-0" / "best.pt", plain, tmp_path / "o2")
    assert proc.returncode == 2 and "odd.png (30×30)" in proc.stderr and not (tmp_path / "o2").exists()
