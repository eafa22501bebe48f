"""Baselines must fail loudly when wrong: exact decryption with the key, none without it."""

import pytest
import torch

from pp_flower.baselines.pixel import PixelEncryption
from pp_flower.baselines.tanaka import AdaptationNetwork, TanakaEncryption, block_scramble, split_nibbles, to_blocks
from pp_flower.models import ResNet20


def _images(splits, n=16):
    return splits.test.images[:n]


def test_tanaka_decrypts_exactly_with_its_key_only(splits):
    x = _images(splits)
    enc = TanakaEncryption(key=7).encrypt(x)
    assert enc.shape == (16, 6, 32, 32) and enc.dtype == torch.uint8 and enc.max() <= 15
    assert torch.equal(TanakaEncryption(key=7).decrypt(enc), x)
    assert not torch.equal(TanakaEncryption(key=8).decrypt(enc), x)
    assert not torch.equal(split_nibbles(x), enc)


def test_block_scrambling_keeps_each_blocks_components(splits):
    comps = to_blocks(split_nibbles(_images(splits, 4)), 4)
    perm = TanakaEncryption(key=3).permutation
    scrambled = block_scramble(comps, perm)
    assert not torch.equal(scrambled, comps)
    assert torch.equal(torch.sort(scrambled, dim=-1).values, torch.sort(comps, dim=-1).values)


def test_adaptation_network_output_fits_psi():
    enc = TanakaEncryption(key=1)(torch.rand(5, 3, 32, 32))
    out = AdaptationNetwork()(enc)
    assert out.shape == (5, 3, 32, 32)
    assert ResNet20()(out).shape == (5, 10)


def test_pixel_encryption_single_and_per_image_keys(splits):
    x = _images(splits)
    single = PixelEncryption(key=11)
    enc = single.encrypt(x)
    assert torch.equal(single.decrypt(enc), x) and not torch.equal(enc, x)
    assert not torch.equal(PixelEncryption(key=12).decrypt(enc), x)
    per_image = PixelEncryption(key=11, per_image=True)
    idx = torch.arange(100, 116)
    enc2 = per_image.encrypt(x, idx)
    assert torch.equal(per_image.decrypt(enc2, idx), x)
    assert not torch.equal(per_image.decrypt(enc2, idx + 1), x)
    # same image content at two indices encrypts differently only in the per-image variant
    twice = torch.cat([x[:1], x[:1]])
    assert torch.equal(single.encrypt(twice)[0], single.encrypt(twice)[1])
    assert not torch.equal(per_image.encrypt(twice)[0], per_image.encrypt(twice)[1])


def test_baselines_are_attack_targets(tmp_path, data_dir):
    import json

    import pytest

    from pp_flower.attack import AttackConfig
    from pp_flower.errors import PPFlowerError
    from pp_flower.evaluation import attack_targets

    cfg = AttackConfig(epochs=1, batch_size=64, unet_base=4, unet_depth=2)
    summary = attack_targets(baseline="tanaka", key=3, out=tmp_path, cfg=cfg, data_dir=data_dir, limit_train=256,
                             limit_eval=64, log=lambda *a: None)
    assert list(summary) == ["tanaka-key3-ITN"]  # the key is part of the stored result's name
    result = json.loads((tmp_path / "tanaka-key3-ITN" / "attack.json").read_text())
    assert len(result["per-image"]["psnr-estimated"]) == 64 and result["target"] == "tanaka-key3 (ITN)"
    with pytest.raises(PPFlowerError, match="Unknown baseline 'rot13'"):
        attack_targets(baseline="rot13", key=1, out=tmp_path, cfg=cfg, data_dir=data_dir, log=lambda *a: None)


@pytest.mark.parametrize("baseline", ["tanaka", "pixel", "pixel-per-image"])
def test_classifier_trains_on_encrypted_images(baseline, tmp_path, data_dir):
    import json

    from pp_flower.checkpoints import load_classifier
    from pp_flower.classifier import ClassifierConfig, model_input, train_classifier
    from pp_flower.data import load_splits, to_float

    small = load_splits(data_dir, limit_train=256, limit_eval=64)
    cfg = ClassifierConfig(epochs=1, batch_size=64, baseline=baseline, key=5)
    metrics = train_classifier(small, tmp_path, cfg, log=lambda *a: None)
    assert metrics["baseline"] == baseline and metrics["key"] == 5
    model, blob = load_classifier(tmp_path / "best.pt")
    from pp_flower.classifier import evaluate

    test_ids = small.test_ids + len(small.train_all)  # as train_classifier numbers test images for per-image keys
    assert metrics["test-accuracy"] == evaluate(model, small.test, "cpu", cfg=cfg, ids=test_ids)["accuracy"]
    assert blob["baseline"] == baseline and blob["key"] == 5
    x = model_input(small.test.images[:4], small.test_ids[:4], cfg)
    assert not torch.allclose(x[:, :3], to_float(small.test.images[:4]))  # ψ never sees the plain image
    assert model(x).shape == (4, 10)
    assert json.loads((tmp_path / "metrics.json").read_text())["baseline"] == baseline


def test_per_image_key_attack_target_draws_fresh_keys(splits):
    from pp_flower.baselines import BASELINES
    from pp_flower.data import to_float

    x = to_float(_images(splits))
    single, per_image = BASELINES["pixel"](7), BASELINES["pixel-per-image"](7)
    assert torch.equal(single(x), single(x))              # one key: the same image always encrypts the same
    assert not torch.equal(per_image(x), per_image(x))    # per-image keys: an attacker never sees a key twice


def test_gan_transformation_learns_its_target_and_is_a_transform_net(tmp_path, data_dir):
    """G's L1 distance to the target encryption falls over epochs; the result loads like any h_θ."""
    import json

    from pp_flower.baselines.gan import GanConfig, target_encryption, train_gan_transform
    from pp_flower.checkpoints import load_transform_net
    from pp_flower.classifier import ClassifierConfig, model_input
    from pp_flower.data import load_splits, to_float

    small = load_splits(data_dir, limit_train=1024, limit_eval=16)
    cfg = GanConfig(epochs=2, batch_size=64, unet_base=8, lr=2e-3, key=4)
    metrics = train_gan_transform(small, tmp_path, cfg, log=lambda *a: None)
    l1 = [h["loss-g-l1"] for h in metrics["history"]]
    print("GAN L1 per epoch", l1)
    assert l1[-1] < 0.9 * l1[0], l1
    generator, blob = load_transform_net(tmp_path / "transform.pt")
    assert blob["baseline"] == "gan" and blob["config"]["key"] == 4
    x = small.test.images[:8]
    with torch.no_grad():
        protected = generator(to_float(x))
    # closer to the encrypted image than to the plain one (what the GAN is trained towards)
    target = to_float(target_encryption(cfg).encrypt(x))
    assert (protected - target).abs().mean() < (protected - to_float(x)).abs().mean()
    # ψ for the GAN row sees exactly G's output
    psi_cfg = ClassifierConfig(baseline="gan", transform=str(tmp_path / "transform.pt"))
    assert torch.allclose(model_input(x, small.test_ids[:8], psi_cfg), protected, atol=1e-6)
    # a finished GAN stage is not retrained
    assert train_gan_transform(small, tmp_path, cfg, log=lambda *a: None) == json.loads(
        (tmp_path / "metrics.json").read_text())
