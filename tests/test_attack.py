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
    return subprocess.run([sys.executable, "-m", "cli.ppflower", *map(str, args)], capture_output=True, text=True,
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
    from pp_flower import wire
    from pp_flower.evaluation import wire_of_run

    run_wire = wire_of_run(run_dir)
    summary = json.loads((out / "summary.json").read_text())["attacks"]
    attackers = ["ITN", "ITN+feat", "restorer"] + (["ITN-logit", "restorer-logit"] if run_wire == "float32" else [])
    assert set(summary) == {f"{user}-{a}" for user in ("user-0", "user-1") for a in attackers}
    targets = json.loads((out / "summary.json").read_text())["targets"]
    for user in ("user-0", "user-1"):
        net, _ = load_transform_net(run_dir / user / "best.pt")
        with torch.no_grad():
            expected = psnr(wire.provider_view(net(x), run_wire), x)
        assert targets[user]["wire"] == run_wire and set(targets[user]["attackers"]) == set(attackers)
        for attacker in attackers:
            result = json.loads((out / f"{user}-{attacker}" / "attack.json").read_text())
            # the protected images measured are exactly what the provider held of this user's h_θ(x)
            assert result["per-image"]["psnr-protected"] == pytest.approx(expected.tolist(), abs=1e-3)
            assert result["psnr-estimated"]["median"] == pytest.approx(
                statistics.median(result["per-image"]["psnr-estimated"]), abs=1e-6)
            assert summary[f"{user}-{attacker}"]["psnr-estimated"] == result["psnr-estimated"]
            assert result["wire"] == run_wire
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
    assert set(json.loads((out / "summary.json").read_text())["attacks"]) == set(summary)  # earlier ones stay


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


# --------------------------------------------------------------------- issue #22: the wire, the restorer, best attack


class _ToyH(torch.nn.Module):
    """A keyless, invertible stand-in for h_θ: x̂ = sigmoid(6·(0.5 − x)) with the colour channels rotated. Its x̂ is
    not on the 1/255 grid, so the uint8 wire changes it."""

    def forward(self, x):
        return torch.sigmoid(6 * (0.5 - x[:, [2, 0, 1]]))


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: on a busy shared 2-core machine two threads made a 1 s toy attack
    take 2–20 s (they wait for each other); the numbers barely change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(data_dir):
    """128 / 32 / 32 real CIFAR-10 images, centre-cropped to 8×8 (about a second per attack)."""
    from dataclasses import replace

    from pp_flower.data import ImageSet

    s = load_splits(data_dir, limit_train=128, limit_eval=32)
    crop = lambda part: ImageSet(part.images[:, :, 12:20, 12:20].contiguous(), part.labels, part.classes)  # noqa: E731
    return replace(s, train=crop(s.train), val=crop(s.val), test=crop(s.test))


class _Spy:
    """Records every input of the attacker's U-Net (not of h_θ, φ or D) while active."""

    def __init__(self):
        self.seen = []

    def __enter__(self):
        from pp_flower.models import UNet

        def hook(module, args):
            if isinstance(module, UNet):
                self.seen.append(args[0].detach().clone())

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _quiet(*a):
    return None


def test_attackers_train_and_evaluate_on_exactly_the_providers_tensor(toy, tmp_path, one_thread):
    """Positive control: each attacker sees wire.provider_view(h(x), "uint8") bit for bit — in training, validation
    and test — and handed a tensor without x in it (noise through the same wire) it does clearly worse."""
    from pp_flower import wire
    from pp_flower.attack import ProviderTarget, restorer_config

    h = _ToyH()
    x_test = to_float(toy.test.images)
    expected = wire.provider_view(h(x_test), "uint8")
    assert not torch.equal(expected, h(x_test))  # the wire does change x̂: the check below can fail
    itn = AttackConfig(epochs=8, batch_size=16, lr=0.5, unet_base=4, unet_depth=2)
    attackers = {"ITN": itn, "restorer": restorer_config(itn, lr=1e-2, perceptual=0.0)}
    psnrs = {}
    for name, cfg in attackers.items():
        with _Spy() as spy:
            right = train_attack(ProviderTarget(h, "uint8"), toy, tmp_path / f"{name}-A", cfg, log=_quiet,
                                 attacker=name)
        assert spy.seen and all(torch.equal(t, torch.round(t * 255) / 255) for t in spy.seen)  # all on q/255
        # evaluation (its last full-test-set call; the 8-image figure comes after it): exactly the provider's x̂
        assert torch.equal([t for t in spy.seen if len(t) == len(x_test)][-1], expected)
        assert right["wire"] == "uint8" and right["input"] == "image" and right["attacker"] == name
        assert right["cache-key"]["wire"] == "uint8"
        # the protected images measured are the provider's q/255, not h's float x̂
        assert right["per-image"]["psnr-protected"] == pytest.approx(psnr(expected, x_test).tolist(), abs=1e-4)
        wrong = train_attack(ProviderTarget(lambda x: torch.rand_like(x), "uint8"), toy, tmp_path / f"{name}-noise",
                             cfg, log=_quiet, attacker=name)
        psnrs[name] = (right["psnr-estimated"]["median"], wrong["psnr-estimated"]["median"])
        assert psnrs[name][0] > psnrs[name][1] + 3.0, psnrs  # measured: ITN 19.1 vs 13.3, restorer 18.0 vs 13.6 dB


def test_float32_wire_attacker_on_the_logit_sees_logit_of_xhat(toy, tmp_path, one_thread):
    from pp_flower import wire
    from pp_flower.attack import ProviderTarget
    from pp_flower.errors import PPFlowerError

    h = _ToyH()
    x_test = to_float(toy.test.images)
    cfg = AttackConfig(epochs=1, batch_size=16, lr=0.1, unet_base=4, unet_depth=2)
    with _Spy() as spy:
        result = train_attack(ProviderTarget(h, "float32", "logit"), toy, tmp_path, cfg, log=_quiet)
    at_test = [t for t in spy.seen if len(t) == len(x_test)][-1]  # evaluation's call
    assert torch.equal(at_test, wire.logit(h(x_test))) and at_test.abs().max() > 1.0  # a logit, not an image
    assert (result["wire"], result["input"]) == ("float32", "logit")
    assert result["cache-key"]["input"] == "logit"
    # protected-image metrics are of x̂ itself (what a float32 provider holds), not of its logit
    assert result["per-image"]["psnr-protected"] == pytest.approx(psnr(h(x_test), x_test).tolist(), abs=1e-4)
    with pytest.raises(PPFlowerError, match="float32 wire"):
        ProviderTarget(h, "uint8", "logit")
    with pytest.raises(ValueError, match="wire must be one of"):
        ProviderTarget(h, "float16")


def test_restorer_with_perceptual_and_adversarial_terms_resumes_to_the_same_estimator(toy, tmp_path, vgg_weights,
                                                                                      one_thread):
    from pp_flower.attack import ProviderTarget, load_inverse_net, restorer_config

    cfg = restorer_config(AttackConfig(epochs=2, batch_size=32, unet_base=4, unet_depth=2, checkpoint_every=2,
                                       disc_width=4), perceptual=0.01, adversarial=0.01)
    assert (cfg.method, cfg.optim, cfg.beta1, cfg.weight_decay) == ("restorer", "adam", 0.5, 0.0)
    target = ProviderTarget(_ToyH(), "uint8")
    full = train_attack(target, toy, tmp_path / "full", cfg, log=_quiet, attacker="restorer+GAN")
    assert full["method"] == "restorer" and full["selected-on"].startswith("validation l1")
    assert {"loss-d", "loss-g-adv", "train-loss"} <= set(full["history"][0])
    assert load_inverse_net(tmp_path / "full" / "best.pt").in_channels == 3

    calls = {"n": 0}

    def dying(x):
        calls["n"] += 1
        # call 1 probes the channels, 2–5 are epoch 1, 6 validates, 7–8 epoch 2 (resume point after step 2)
        if calls["n"] == 9:  # epoch 2, step 3 of 4: the process "dies"
            raise KeyboardInterrupt
        return _ToyH()(x)

    with pytest.raises(KeyboardInterrupt):
        train_attack(ProviderTarget(dying, "uint8"), toy, tmp_path / "killed", cfg, log=_quiet)
    messages = []
    resumed = train_attack(target, toy, tmp_path / "killed", cfg, log=messages.append)
    assert any("Resuming" in m for m in messages)
    assert resumed["per-image"]["psnr-estimated"] == pytest.approx(full["per-image"]["psnr-estimated"], abs=1e-4)


def test_attack_settings_are_checked():
    from pp_flower.attack import restorer_config
    from pp_flower.errors import PPFlowerError

    for bad, match in (({"method": "gan"}, "--attack-method"), ({"optim": "rmsprop"}, "--attack-optimizer"),
                       ({"l1": 0.5}, "belong to the restorer"), ({"optim": "adam"}, "Adam"),
                       ({"method": "restorer", "l1": 0.0}, "reconstruction term"),
                       ({"method": "restorer", "adversarial": -1.0}, "--adversarial-weight")):
        with pytest.raises(PPFlowerError, match=match):
            AttackConfig(**bad)
    assert restorer_config(adversarial=0.1).beta1 == 0.5


def test_paper_itn_cache_key_is_unchanged_and_the_wire_is_part_of_it(toy, tmp_path, one_thread):
    """Adding the restorer's fields and the wire keeps every result cached for the paper's ITN on h_θ's own
    (float32) output valid; the uint8 provider's tensor is another result and is refused without --force."""
    from dataclasses import asdict

    from pp_flower.attack import ProviderTarget, attack_key
    from pp_flower.errors import PPFlowerError

    before = {"epochs", "batch_size", "lr", "momentum", "weight_decay", "seed", "schedule", "unet_base",
              "unet_depth", "unet_arch", "perceptual", "checkpoint_every"}  # AttackConfig's fields before issue #22
    cfg = AttackConfig(epochs=1, batch_size=64, unet_base=4, unet_depth=2)
    assert set(attack_key(cfg)) == before and attack_key(cfg) == {k: asdict(cfg)[k] for k in before}
    h = _ToyH()
    legacy = train_attack(h, toy, tmp_path, cfg, log=_quiet, target_id="sha256:h")  # a plain callable: as before
    assert legacy["wire"] is None
    done = tmp_path / "attack.json"
    old = json.loads(done.read_text())
    for k in ("wire", "input", "attacker", "target-name", "method", "selected-on"):
        old.pop(k)  # an attack.json as written before issue #22
    done.write_text(json.dumps(old))
    messages = []
    reused = train_attack(ProviderTarget(h, "float32"), toy, tmp_path, cfg, log=messages.append, target_id="sha256:h")
    assert any("up to date" in m for m in messages)
    assert reused["per-image"] == legacy["per-image"] and json.loads(done.read_text())["wire"] == "float32"
    with pytest.raises(PPFlowerError, match=r"differs in: .*wire"):
        train_attack(ProviderTarget(h, "uint8"), toy, tmp_path, cfg, log=_quiet, target_id="sha256:h")


def test_summary_puts_every_attacker_side_by_side_and_names_the_best():
    from pp_flower.attack import best_attack, summarise_attacks

    def result(target, attacker, wire, p, s, acc=None):
        r = {"target-name": target, "attacker": attacker, "wire": wire, "input": "image", "method": "itn",
             "psnr-estimated": {"median": p}, "ssim-estimated": {"median": s},
             "psnr-protected": {"median": 7.0}, "ssim-protected": {"median": 0.1}}
        return {**r, **({"recognisability-estimated": acc, "recognisability-protected": 0.1} if acc is not None
                        else {})}

    results = {"u-ITN": result("u", "ITN", "uint8", 14.0, 0.30, 0.20),
               "u-restorer": result("u", "restorer", "uint8", 13.0, 0.45, 0.35),
               "u-ITN+feat": result("u", "ITN+feat", "uint8", 14.5, 0.25, 0.30),
               "v-ITN": result("v", "ITN", "float32", 20.0, 0.6),
               "v-ITN-logit": result("v", "ITN-logit", "float32", 22.0, 0.7)}
    table = summarise_attacks(results)
    assert set(table) == {"u", "v"}
    u = table["u"]
    assert u["wire"] == "uint8" and set(u["attackers"]) == {"ITN", "restorer", "ITN+feat"}
    assert u["best"] == {"psnr-median": {"attacker": "ITN+feat", "value": 14.5},
                         "ssim-median": {"attacker": "restorer", "value": 0.45},
                         "observer-accuracy": {"attacker": "restorer", "value": 0.35}}
    assert u["protected"] == {"psnr-median": 7.0, "ssim-median": 0.1, "observer-accuracy": 0.1}
    assert table["v"]["best"]["psnr-median"]["attacker"] == "ITN-logit"
    assert table["v"]["best"]["observer-accuracy"] is None  # no observer: not measured, not zero
    # the same target attacked under two wires: two entries, never compared with each other
    results["u-ITN-old"] = {**result("u", "ITN", "float32", 30.0, 0.9), "attacker": "ITN"}
    split = summarise_attacks(results)
    assert set(split) == {"u [uint8]", "u [float32]", "v"}
    assert split["u [uint8]"]["best"]["psnr-median"]["value"] == 14.5
    assert best_attack({"a": {"psnr-median": None, "ssim-median": None, "observer-accuracy": None}}) == {
        "psnr-median": None, "ssim-median": None, "observer-accuracy": None}


def test_attack_targets_uses_the_runs_wire_and_writes_the_best_attack(tmp_path, vgg_weights, one_thread):
    """A float32 run: every attacker, the logit ones too, in summary.json with the observer's accuracy on its
    estimates (recomputed here from the saved estimator) and the best by each criterion."""
    from pp_flower import wire
    from pp_flower.attack import load_inverse_net, restorer_config
    from pp_flower.checkpoints import load_classifier, load_transform_net, save_atomic, transform_blob
    from pp_flower.classifier import ClassifierConfig, train_classifier
    from pp_flower.errors import PPFlowerError
    from pp_flower.evaluation import attack_targets, wire_of_run
    from pp_flower.models import UNet
    from torchvision.utils import save_image

    data, g = tmp_path / "d", torch.Generator().manual_seed(0)
    for part in ("train", "test"):  # 2 classes × 8 random 8×8 PNGs
        for label in ("a", "b"):
            (data / part / label).mkdir(parents=True)
            for i in range(8):
                save_image(torch.rand(3, 8, 8, generator=g), data / part / label / f"{i}.png")
    splits = load_splits(data)
    train_classifier(splits, tmp_path / "obs", ClassifierConfig(epochs=1, batch_size=8), log=_quiet)
    torch.manual_seed(0)
    save_atomic(transform_blob(UNet(4, 2), (8, 8)), tmp_path / "run" / "user-0" / "best.pt")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"wire": "float32"}}))
    assert wire_of_run(tmp_path / "run") == "float32"
    cfg = AttackConfig(epochs=1, batch_size=4, unet_base=4, unet_depth=2)
    with pytest.raises(PPFlowerError, match="float32 wire"):
        attack_targets(run_dir=tmp_path / "run", out=tmp_path / "atk", cfg=cfg, data_dir=data, log=_quiet,
                       wire="uint8")
    flat = attack_targets(run_dir=tmp_path / "run", out=tmp_path / "atk", cfg=cfg, data_dir=data, log=_quiet,
                          restorer=restorer_config(cfg, perceptual=0.01), observer=tmp_path / "obs" / "best.pt")
    assert set(flat) == {"user-0-ITN", "user-0-ITN-logit", "user-0-restorer", "user-0-restorer-logit"}
    summary = json.loads((tmp_path / "atk" / "summary.json").read_text())
    assert summary["attacks"] == json.loads(json.dumps(flat))
    entry = summary["targets"]["user-0"]
    assert entry["wire"] == "float32" and set(entry["attackers"]) == {"ITN", "ITN-logit", "restorer", "restorer-logit"}
    assert {row["input"] for row in entry["attackers"].values()} == {"image", "logit"}
    for criterion in ("psnr-median", "ssim-median", "observer-accuracy"):
        best = entry["best"][criterion]
        assert best["value"] == max(row[criterion] for row in entry["attackers"].values())
        assert entry["attackers"][best["attacker"]][criterion] == best["value"]
    # the observer's accuracy on the logit restorer's estimates, recomputed from its saved network
    observer, _ = load_classifier(tmp_path / "obs" / "best.pt")
    net, _ = load_transform_net(tmp_path / "run" / "user-0" / "best.pt")
    x = to_float(splits.test.images)
    with torch.no_grad():
        estimate = load_inverse_net(tmp_path / "atk" / "user-0-restorer-logit" / "best.pt")(
            wire.logit(wire.provider_view(net.eval()(x), "float32")))
        accuracy = (observer(estimate).argmax(1) == splits.test.labels).double().mean().item()
    assert entry["attackers"]["restorer-logit"]["observer-accuracy"] == pytest.approx(accuracy)
