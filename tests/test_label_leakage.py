"""The provider's gradients leak the labels (Li et al. 2022, arXiv 2102.08504), and the probe measures it honestly.

A toy split-learning setting: a tiny fixed ψ over 3×8×8 "images"; the provider's answer per image is
g = ∂CE(ψ(x̂), y)/∂x̂ (reduction='sum', so each row is that image's own gradient). The attacks must label far
above chance from g alone, and fall to chance when the gradients no longer belong to the labels (shuffled) —
the positive control that keeps the "far above chance" assertions honest.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.label_leakage import (
    SOURCE,
    LabelProbe,
    best_match_accuracy,
    direction_attack,
    format_table,
    known_labels_attack,
    norm_attack_auc,
    summarise,
    two_most_frequent_classes,
)

REPORT_KEYS = {"n-images", "n-classes", "chance", "direction-accuracy", "known-10-accuracy", "norm-auc", "source"}


def tiny_psi(n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, n_classes))


def cut_gradients(psi: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The provider's answer: ∂CE/∂x̂ per image (a sum of per-image losses, so rows do not mix; ψ in eval mode)."""
    psi.eval()
    leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(psi(leaf), y, reduction="sum"), leaf)
    return g


def balanced(n_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(n_classes).repeat_interleave(per_class)


def shuffled(y: torch.Tensor, seed: int) -> torch.Tensor:
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def random_setting(n_classes: int, seed: int, per_class: int = 60):
    """A weak (untrained) ψ on uniform random images: x̂ as an untrained h_θ might send it."""
    y = balanced(n_classes, per_class)
    x = torch.rand(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
    return cut_gradients(tiny_psi(n_classes, seed), x, y), y


@pytest.fixture(scope="module")
def trained_setting():
    """ψ trained to ~99 % accuracy on class prototypes + noise; the gradients of fresh images of 6 classes."""
    k = 6
    protos = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def sample(per_class, seed):
        y = balanced(k, per_class)
        return protos[y] + 0.5 * torch.randn(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(seed)), y

    psi = tiny_psi(k, 0)
    x_train, y_train = sample(100, 1)
    opt = torch.optim.SGD(psi.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(psi(x_train), y_train).backward()
        opt.step()
    x, y = sample(60, 2)
    with torch.no_grad():
        assert (psi.eval()(x).argmax(1) == y).float().mean().item() > 0.9  # measured 0.99
    return cut_gradients(psi, x, y), y, k


@pytest.fixture(scope="module")
def imbalanced_setting():
    """Li et al.'s norm-attack setting: two classes, 300 : 100, ψ trained on the imbalance (confident on class 0)."""
    protos = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(n0, n1, seed):
        y = torch.cat([torch.zeros(n0, dtype=torch.int64), torch.ones(n1, dtype=torch.int64)])
        return protos[y] + torch.randn(len(y), 3, 8, 8, generator=torch.Generator().manual_seed(seed)), y

    psi = tiny_psi(2, 0)
    x_train, y_train = sample(300, 100, 1)
    opt = torch.optim.SGD(psi.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(psi(x_train), y_train).backward()
        opt.step()
    x, y = sample(300, 100, 2)
    return cut_gradients(psi, x, y), y


# ------------------------------------------------------------------------------------------ the attacks work


@pytest.mark.parametrize("n_classes", [4, 6, 10])
def test_a_weak_psis_gradients_give_the_labels_away(n_classes):
    g, y = random_setting(n_classes, seed=1)
    direction = best_match_accuracy(direction_attack(g, n_classes), y, n_classes)
    known = known_labels_attack(g, y, known_per_class=10)
    # measured: direction 1.00 and known-10 1.00 for 4, 6 and 10 classes; the margin is for k-means' local optima
    # (another ψ seed gave 0.87 at 10 classes)
    assert direction >= 0.75, direction
    assert known >= 0.95, known


def test_a_trained_psis_gradients_give_the_labels_away(trained_setting):
    g, y, k = trained_setting
    assert best_match_accuracy(direction_attack(g, k), y, k) >= 0.9  # measured 1.00
    assert known_labels_attack(g, y, 10) >= 0.95  # measured 1.00


@pytest.mark.parametrize("n_classes", [4, 6, 10])
def test_shuffled_gradients_label_at_chance(n_classes):
    """Positive control: the same gradients, no longer matched to their labels, tell nothing."""
    g, y = random_setting(n_classes, seed=1)
    chance = 1 / n_classes
    clusters = direction_attack(g, n_classes)
    for seed in range(3):
        y_shuffled = shuffled(y, seed)
        # best matching picks the luckiest correspondence, so it sits a little above chance: measured ≤ +0.07
        assert best_match_accuracy(clusters, y_shuffled, n_classes) <= chance + 0.12
        assert known_labels_attack(g, y_shuffled, 10, seed=seed) <= chance + 0.08  # measured ≤ +0.025


def test_shuffled_trained_gradients_label_at_chance(trained_setting):
    g, y, k = trained_setting
    for seed in range(3):
        assert best_match_accuracy(direction_attack(g, k), shuffled(y, seed), k) <= 1 / k + 0.1  # measured ≤ +0.05
        assert known_labels_attack(g, shuffled(y, seed), 10) <= 1 / k + 0.08  # measured ≤ +0.027


def test_the_norm_attack_separates_an_imbalanced_pair_and_not_a_shuffled_one(imbalanced_setting):
    g, y = imbalanced_setting
    auc = norm_attack_auc(g, y)
    assert auc >= 0.9, auc  # measured 1.00: ψ is confident on the frequent class, its gradients are small
    for seed in range(5):
        # chance is 0.5; choosing the positive class by the larger mean norm lifts it slightly (sd ≈ 0.03 here;
        # measured 0.49–0.53)
        assert 0.38 <= norm_attack_auc(g, shuffled(y, seed)) <= 0.62


# --------------------------------------------------------------------------------------- the attacks' parts


def test_spherical_kmeans_finds_separated_directions_whatever_their_length():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 40, generator=gen), dim=1)
    y = balanced(5, 30)
    directions = F.normalize(centres[y] + 0.05 * torch.randn(len(y), 40, generator=gen), dim=1)
    scale = torch.exp(3 * torch.randn(len(y), 1, generator=gen))  # norms spread over orders of magnitude
    g = (directions * scale).reshape(len(y), 2, 4, 5)
    clusters = direction_attack(g, 5, seed=7)
    assert clusters.dtype == torch.int64 and clusters.shape == (len(y),)
    assert best_match_accuracy(clusters, y, 5) == 1.0
    assert torch.equal(clusters, direction_attack(g, 5, seed=7))  # deterministic for a seed
    assert torch.equal(clusters, direction_attack(g.double(), 5, seed=7))


def test_the_best_matching_is_the_best_relabelling():
    """best_match_accuracy takes the best of all cluster→class maps (brute force over every permutation)."""
    rng = np.random.default_rng(0)
    for k in (2, 3, 5, 6):
        for _ in range(10):
            clusters, labels = (torch.as_tensor(rng.integers(0, k, size=40)) for _ in range(2))
            best = max(sum(int(((clusters == c) & (labels == p[c])).sum()) for c in range(k))
                       for p in itertools.permutations(range(k)))
            assert best_match_accuracy(clusters, labels, k) == pytest.approx(best / 40)


def test_best_match_accuracy_counts_the_best_relabelling():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    assert best_match_accuracy(torch.tensor([2, 2, 2, 0, 0, 1, 1, 1]), labels, 3) == 1.0
    assert best_match_accuracy(torch.tensor([1, 1, 0, 0, 0, 2, 2, 2]), labels, 3) == pytest.approx(7 / 8)
    # more clusters than classes: the unmatched cluster counts as wrong
    assert best_match_accuracy(torch.tensor([0, 0, 0, 1, 1, 2, 2, 3]), labels, 3) == pytest.approx(7 / 8)


def test_norm_auc_is_exact_from_ranks_and_never_folded():
    def grads_with_norms(norms):
        return torch.tensor(norms, dtype=torch.float64)[:, None, None, None] * torch.ones(1, 3, 2, 2) / math.sqrt(12)

    y = torch.tensor([0, 0, 0, 1, 1, 1])
    # class 1 has the larger mean norm, so it is the positive: P(norm₁ > norm₀) + ½·P(tie) = 7.5 / 9
    assert norm_attack_auc(grads_with_norms([1, 2, 3, 2, 4, 5]), y) == pytest.approx(7.5 / 9)
    # the larger mean but mostly smaller ranks: the AUC falls below 0.5 and is reported so, not as 1 − AUC
    y4 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert norm_attack_auc(grads_with_norms([0.1, 0.1, 0.1, 10, 1, 1, 1, 1]), y4) == pytest.approx(0.25)
    assert two_most_frequent_classes(torch.tensor([3, 1, 1, 2, 2, 3, 3, 0])) == (3, 1)  # ties: lower index


# --------------------------------------------------------------------------------------------- the probe


def test_the_probe_is_bounded_and_keeps_the_latest_gradient_of_each_id():
    probe = LabelProbe(max_images=5)
    first = torch.randn(4, 3, 8, 8)
    probe.observe(torch.tensor([10, 11, 12, 10]), first)  # id 10 twice in a batch: the last row wins
    assert len(probe) == 3
    later = torch.randn(4, 3, 8, 8)
    probe.observe(torch.tensor([12, 13, 14, 15]), later)  # 15 is a sixth id: ignored
    ids, grads = probe.gradients()
    assert ids.tolist() == [10, 11, 12, 13, 14]
    assert grads.shape == (5, 3, 8, 8) and grads.dtype == torch.float32
    expected = torch.stack([first[3], first[1], later[0], later[1], later[2]])
    torch.testing.assert_close(grads, expected, rtol=2e-3, atol=1e-3 * expected.abs().max().item())
    probe.observe(torch.tensor([15, 16]), torch.randn(2, 3, 8, 8))
    assert probe.ids().tolist() == [10, 11, 12, 13, 14]
    assert probe.state_dict()["directions"].dtype == torch.float16


def test_the_probe_keeps_tiny_gradients_that_float16_would_flush():
    g, y = random_setting(4, seed=1, per_class=20)
    tiny = g * 1e-9  # far below float16's smallest subnormal (6e-8)
    probe = LabelProbe()
    probe.observe(torch.arange(len(y)), tiny)
    _, kept = probe.gradients()
    assert torch.allclose(kept.double(), tiny.double(), rtol=2e-3, atol=2e-3 * tiny.abs().max().item())
    report = probe.report(y, 4)
    assert report["direction-accuracy"] == best_match_accuracy(direction_attack(g, 4), y, 4)


def test_the_probe_saves_and_loads_as_plain_tensors(tmp_path):
    probe = LabelProbe(max_images=50)
    probe.observe(torch.tensor([7, 3, 9]), torch.randn(3, 3, 8, 8))
    probe.observe(torch.tensor([3, 20]), torch.randn(2, 3, 8, 8))
    path = tmp_path / "sub" / "probe.pt"
    probe.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["probe.pt"]  # no temporary file left behind
    state = torch.load(path, weights_only=True)
    for key, value in probe.state_dict().items():
        assert torch.equal(state[key], value), key
    loaded = LabelProbe.load(path)
    assert loaded.max_images == 50 and loaded.shape == (3, 8, 8)
    for a, b in zip(loaded.gradients(), probe.gradients()):
        assert torch.equal(a, b)
    loaded.observe(torch.tensor([3, 21]), torch.zeros(2, 3, 8, 8))  # a loaded probe goes on observing
    assert loaded.ids().tolist() == [3, 7, 9, 20, 21]
    empty = LabelProbe.from_state_dict(LabelProbe(4).state_dict())
    assert len(empty) == 0 and empty.max_images == 4


def test_the_probe_reports_the_leakage(trained_setting):
    g, y, k = trained_setting
    probe = LabelProbe(max_images=1000)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    ids = order + 1000  # ids are the dataset's, not positions: labels_of is indexed by id
    labels_by_id = torch.full((2000,), -1, dtype=torch.int64)
    labels_by_id[ids] = y[order]
    for batch in torch.split(torch.arange(len(y)), 64):
        probe.observe(ids[batch], g[order[batch]])
    report = probe.report(labels_by_id, k)
    assert set(report) == REPORT_KEYS
    assert report["n-images"] == len(y) and report["n-classes"] == k and report["chance"] == pytest.approx(1 / k)
    assert report["source"] == SOURCE
    assert report["direction-accuracy"] >= 0.9 and report["known-10-accuracy"] >= 0.95
    assert report["norm-auc"] is not None and 0.0 <= report["norm-auc"] <= 1.0
    json.dumps(report)
    assert probe.report(lambda i: labels_by_id[i], k) == report  # a function or a tensor: the same


def test_the_report_leaves_out_what_it_cannot_measure():
    probe = LabelProbe()
    g, y = random_setting(4, seed=2, per_class=8)  # 8 ≤ 10 images per class: no known-10 attack
    probe.observe(torch.arange(len(y)), g)
    report = probe.report(y, 4)
    assert report["known-10-accuracy"] is None and report["norm-auc"] is not None
    one_class = LabelProbe()
    one_class.observe(torch.arange(6), g[:6])
    report = one_class.report(torch.zeros(6, dtype=torch.int64), 3)
    assert report["norm-auc"] is None and report["known-10-accuracy"] is None
    assert report["chance"] == pytest.approx(1 / 3)


def test_summary_and_table_across_users():
    reports = [{"n-images": 100, "n-classes": 10, "chance": 0.1, "direction-accuracy": 0.9,
                "known-10-accuracy": None, "norm-auc": 0.7, "source": SOURCE},
               {"n-images": 200, "n-classes": 10, "chance": 0.1, "direction-accuracy": 0.5,
                "known-10-accuracy": 0.6, "norm-auc": 0.9, "source": SOURCE, "user": "u7"}]
    s = summarise(reports)
    assert s["n-users"] == 2 and s["chance"] == pytest.approx(0.1)
    assert s["direction-accuracy"] == {"mean": pytest.approx(0.7), "min": 0.5, "max": 0.9, "n": 2}
    assert s["known-10-accuracy"] == {"mean": 0.6, "min": 0.6, "max": 0.6, "n": 1}
    json.dumps(s)
    table = format_table(reports)
    lines = table.splitlines()
    assert any(line.split()[:2] == ["0", "100"] and "0.100" in line and " - " in line for line in lines)
    assert any(line.split()[0] == "u7" and "0.500" in line for line in lines)
    assert any(line.startswith("  mean") and "0.700" in line for line in lines)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, message", [
    (lambda: direction_attack(torch.randn(5, 3, 2, 2), 1), "n_classes"),
    (lambda: direction_attack(torch.randn(3, 3, 2, 2), 4), "at least as many images as classes"),
    (lambda: direction_attack(torch.full((5, 4), float("nan")), 2), "NaN"),
    (lambda: direction_attack(torch.randn(5, 4), 2, restarts=0), "restarts"),
    (lambda: direction_attack(torch.randn(5), 2), "shape"),
    (lambda: best_match_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 2), "match one to one"),
    (lambda: best_match_accuracy(torch.tensor([0, 1]), torch.tensor([0, 5]), 2), "[0, 2)"),
    (lambda: best_match_accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 2), "integer"),
    (lambda: known_labels_attack(torch.randn(40, 4), torch.zeros(39, dtype=torch.int64)), "match one to one"),
    (lambda: known_labels_attack(torch.randn(40, 4), balanced(2, 20), known_per_class=20), "too few"),
    (lambda: known_labels_attack(torch.randn(40, 4), torch.zeros(40, dtype=torch.int64)), "two classes"),
    (lambda: norm_attack_auc(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])), "exactly two classes"),
    (lambda: two_most_frequent_classes(torch.tensor([1, 1])), "two classes"),
    (lambda: LabelProbe(max_images=0), "max_images"),
    (lambda: LabelProbe().observe(torch.arange(3), torch.randn(2, 3, 4, 4)), "n = 3"),
    (lambda: LabelProbe().report(torch.arange(10), 2), "fewer than the 2 classes"),
    (lambda: LabelProbe.from_state_dict({"ids": torch.arange(3)}), "keys"),
])
def test_bad_input_is_one_clear_value_error(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_the_probe_refuses_a_changed_shape_and_a_foreign_file(tmp_path):
    probe = LabelProbe()
    probe.observe(torch.arange(2), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="differs"):
        probe.observe(torch.arange(2), torch.randn(2, 3, 8, 8))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read a LabelProbe"):
        LabelProbe.load(bad)
    state = probe.state_dict()
    state["norms"] = state["norms"][:1]
    with pytest.raises(ValueError, match="inconsistent"):
        LabelProbe.from_state_dict(state)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        probe.report(torch.tensor([0, 3]), 2)
