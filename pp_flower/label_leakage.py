"""How much the provider's gradients tell a user about the labels it never receives.

In the split protocol the user sends x̂ = h_θ(x) and gets back only g = ∂CE(ψ(x̂), y)/∂x̂ per image. The project
says the labels y stay with the provider, but in two-party split learning such cut-layer gradients leak them
(Li et al., "Label Leakage and Protection in Two-party Split Learning", ICLR 2022, arXiv 2102.08504):

* direction attack — gradients of examples of the same class point alike (high cosine similarity), of different
  classes apart: clustering the directions (:func:`direction_attack`), or comparing them with the directions of
  a few examples whose labels the user knows (:func:`known_labels_attack`), labels the rest;
* norm attack — the gradient's L2 norm differs by class (a confident ψ returns small gradients on the class it
  favours), so the norm alone separates two classes (:func:`norm_attack_auc`).

This module is a measurement harness: the true labels are used only to *score* the attacks, except for the
``known_per_class`` labels that :func:`known_labels_attack` lets the attacker know. :class:`LabelProbe` is what a
user keeps of the gradients it received, bounded in memory, so a run can report its leakage afterwards.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pp_flower.checkpoints import save_atomic
from pp_flower.seeds import generator

SOURCE = "Li et al. 2022 (arXiv 2102.08504)"
KNOWN_PER_CLASS = 10
METRICS = ("direction-accuracy", "known-10-accuracy", "norm-auc")
_KMEANS_MAX_ITER = 100


# ----------------------------------------------------------------------------------------------- helpers


def _check_grads(grads: Tensor) -> Tensor:
    """``grads`` (n, ...) as (n, d) float64 rows; ValueError on a non-tensor, no features or non-finite values."""
    if not isinstance(grads, Tensor):
        kind = type(grads).__name__
        raise ValueError(f"gradients must be a torch.Tensor of shape (n, ...), not {kind}.")  # noqa: TRY004
    if grads.dim() < 2 or grads.shape[0] == 0 or grads[0].numel() == 0:
        raise ValueError(f"gradients must have shape (n, ...) with n ≥ 1 and at least one value per image, "
                         f"not {tuple(grads.shape)}.")
    if grads.is_complex() or not (grads.is_floating_point()):
        raise ValueError(f"gradients must be real floating-point values, not {grads.dtype}.")
    flat = grads.detach().to("cpu", torch.float64).reshape(grads.shape[0], -1)
    if not torch.isfinite(flat).all():
        raise ValueError("gradients contain NaN or infinite values.")
    return flat


def _check_labels(labels: Tensor | Sequence[int], n: int | None, what: str = "labels",
                  of: str = "gradients") -> Tensor:
    """``labels`` as an int64 (n,) tensor; ValueError on a wrong length, non-integers or negative values."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D integer tensor, not {labels.dtype} of shape {tuple(labels.shape)}.")
    if n is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} {what} for {n} {of}; they must match one to one.")
    labels = labels.to("cpu", torch.int64)
    if len(labels) and labels.min().item() < 0:
        raise ValueError(f"{what} must be non-negative indices, got {labels.min().item()}.")
    return labels


def _check_n_classes(n_classes: int) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer ≥ 2, not {n_classes!r}.")
    return int(n_classes)


def _unit_rows(flat: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (cosine 0 with everything)."""
    norms = flat.norm(dim=1, keepdim=True)
    return flat / torch.where(norms > 0, norms, torch.ones_like(norms))


# ------------------------------------------------------------------------------------------------ attacks


def direction_attack(grads: Tensor, n_classes: int, seed: int = 0, restarts: int = 5) -> Tensor:
    """Cluster the gradients' directions: Li et al.'s direction attack (cosine similarity), unsupervised.

    Spherical k-means with ``n_classes`` clusters on the flattened, L2-normalised gradients: each image goes to
    the centroid of highest cosine similarity, a centroid is the normalised mean of its members, k-means++
    seeding (squared chordal distance 2 − 2·cos), ``restarts`` runs of at most 100 iterations each, and the run
    of lowest inertia Σ(1 − cos) is kept. An emptied cluster is re-seeded with the image farthest from its
    centroid. All-zero gradients have cosine 0 with every centroid.

    Args:
        grads: (n, ...) the gradients a user received (any float dtype, any device), n ≥ ``n_classes``.
        n_classes: number of clusters k ≥ 2 (the number of classes the attacker assumes).
        seed: the clustering is a deterministic function of (grads, n_classes, seed, restarts).
        restarts: number of k-means++ runs, ≥ 1.

    Returns:
        (n,) int64 cluster indices in [0, n_classes). Cluster indices are arbitrary: score them with
        :func:`best_match_accuracy`.

    Raises:
        ValueError: bad shapes or values, n_classes < 2, fewer images than clusters, restarts < 1.
    """
    flat = _check_grads(grads)
    k = _check_n_classes(n_classes)
    n = flat.shape[0]
    if n < k:
        raise ValueError(f"direction_attack needs at least as many images as classes, got {n} images for {k}.")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer ≥ 1, not {restarts!r}.")
    x = _unit_rows(flat)
    best_assign, best_inertia = None, math.inf
    for r in range(restarts):
        assign, inertia = _spherical_kmeans(x, k, generator(seed, "label-leakage", "kmeans", r))
        if inertia < best_inertia - 1e-12:
            best_assign, best_inertia = assign, inertia
    return best_assign


def _spherical_kmeans(x: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, float]:
    """One run of spherical k-means on unit rows ``x`` (n, d) float64: (assignments (n,), inertia)."""
    n = x.shape[0]
    centres = torch.empty(k, x.shape[1], dtype=x.dtype)
    first = torch.randint(n, (1,), generator=gen).item()
    centres[0] = x[first]
    dist = (2.0 - 2.0 * (x @ centres[0])).clamp_min(0.0)  # squared chordal distance to the nearest centre
    for c in range(1, k):
        total = dist.sum().item()
        if total <= 0.0:  # every image sits on a centre already: pick any not yet taken
            idx = torch.randint(n, (1,), generator=gen).item()
        else:
            idx = torch.multinomial(dist / total, 1, generator=gen).item()
        centres[c] = x[idx]
        dist = torch.minimum(dist, (2.0 - 2.0 * (x @ centres[c])).clamp_min(0.0))
    assign = None
    for _ in range(_KMEANS_MAX_ITER):
        sim = x @ centres.T
        new = sim.argmax(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        best_sim = sim.gather(1, assign[:, None]).squeeze(1)
        for c in torch.nonzero(counts == 0).flatten().tolist():  # re-seed an empty cluster with the worst fit
            far = best_sim.argmin().item()
            sums[c] = x[far]
            best_sim[far] = math.inf
        norms = sums.norm(dim=1, keepdim=True)
        centres = torch.where(norms > 0, sums / torch.where(norms > 0, norms, torch.ones_like(norms)), centres)
    sim = x @ centres.T
    assign = sim.argmax(dim=1)
    inertia = (1.0 - sim.gather(1, assign[:, None])).sum().item()
    return assign, inertia


def best_match_accuracy(clusters: Tensor, labels: Tensor, n_classes: int) -> float:
    """Accuracy of labelling each cluster with one class, under the best one-to-one matching (Hungarian).

    This is an upper bound on what an unsupervised attacker can label: it does not know which cluster is which
    class, and the matching uses the true labels to choose the most favourable correspondence.

    Args:
        clusters: (n,) non-negative int cluster indices (e.g. from :func:`direction_attack`).
        labels: (n,) int class indices in [0, n_classes).
        n_classes: number of classes, ≥ 2. Clusters beyond the matching (more clusters than classes) count as
            wrong.

    Returns:
        The fraction of images whose cluster is matched to their class, in [0, 1].

    Raises:
        ValueError: mismatched lengths, no images, non-integer or out-of-range values, n_classes < 2.
    """
    k = _check_n_classes(n_classes)
    clusters = _check_labels(clusters, None, "cluster indices")
    labels = _check_labels(labels, len(clusters), of="cluster indices")
    if len(labels) == 0:
        raise ValueError("best_match_accuracy needs at least one image.")
    if labels.max().item() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got {labels.max().item()}.")
    size = max(k, int(clusters.max().item()) + 1)
    counts = torch.zeros(size, size, dtype=torch.int64)
    counts.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    from scipy.optimize import linear_sum_assignment  # the Hungarian method

    rows, cols = linear_sum_assignment(counts.numpy(), maximize=True)
    return int(counts[torch.as_tensor(rows), torch.as_tensor(cols)].sum()) / len(labels)


def known_labels_attack(grads: Tensor, labels: Tensor, known_per_class: int = KNOWN_PER_CLASS,
                        seed: int = 0) -> float:
    """Label the gradients from a few known labels: the direction attack with ``known_per_class`` labels per class.

    The attacker knows the labels of ``known_per_class`` images of each class present in ``labels`` (drawn with
    ``seed``). Each class's centroid is the normalised mean of its known images' L2-normalised gradients; every
    other image gets the class of the centroid of highest cosine similarity (Li et al.'s cosine direction
    attack, with the class directions learnt from the known examples).

    Args:
        grads: (n, ...) gradients, any float dtype.
        labels: (n,) int class indices; at least two classes, each with more than ``known_per_class`` images.
        known_per_class: labels known per class, ≥ 1.
        seed: which images are known is a deterministic function of (labels, known_per_class, seed).

    Returns:
        Accuracy on the images whose label the attacker does not know, in [0, 1].

    Raises:
        ValueError: bad shapes or values, mismatched lengths, fewer than two classes, a class with
            ≤ known_per_class images.
    """
    flat = _check_grads(grads)
    labels = _check_labels(labels, flat.shape[0])
    if isinstance(known_per_class, bool) or not isinstance(known_per_class, int) or known_per_class < 1:
        raise ValueError(f"known_per_class must be an integer ≥ 1, not {known_per_class!r}.")
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"known_labels_attack needs at least two classes, got {len(classes)}.")
    if counts.min().item() <= known_per_class:
        small = classes[counts <= known_per_class].tolist()
        raise ValueError(f"every class needs more than {known_per_class} images (the known ones plus some to "
                         f"label); classes {small} have too few.")
    x = _unit_rows(flat)
    gen = generator(seed, "label-leakage", "known", known_per_class)
    known = torch.zeros(len(labels), dtype=torch.bool)
    centres = torch.empty(len(classes), x.shape[1], dtype=x.dtype)
    for i, c in enumerate(classes.tolist()):
        members = torch.nonzero(labels == c).flatten()
        pick = members[torch.randperm(len(members), generator=gen)[:known_per_class]]
        known[pick] = True
        centres[i] = x[pick].sum(dim=0)
    centres = _unit_rows(centres)
    predicted = classes[(x[~known] @ centres.T).argmax(dim=1)]
    return (predicted == labels[~known]).double().mean().item()


def two_most_frequent_classes(labels: Tensor) -> tuple[int, int]:
    """The two classes with the most images in ``labels`` (n,), most frequent first; ties go to the lower index.

    Raises:
        ValueError: fewer than two distinct classes, or labels that are not non-negative integers.
    """
    labels = _check_labels(labels, None)
    classes, counts = torch.unique(labels, return_counts=True)  # sorted by class index
    if len(classes) < 2:
        raise ValueError(f"the norm attack needs two classes, got {len(classes)}.")
    order = sorted(range(len(classes)), key=lambda i: (-int(counts[i]), int(classes[i])))
    return int(classes[order[0]]), int(classes[order[1]])


def norm_attack_auc(grads: Tensor, labels: Tensor) -> float:
    """Li et al.'s norm attack on two classes: the AUC of the gradient's L2 norm as a score for the class.

    The score of an image is ‖g‖₂ of its flattened gradient. The positive class is the one whose gradients have
    the larger mean norm — an attacker can find which one it is from a few known labels, or from which class
    is rarer (ψ is confident on the frequent class and returns it small gradients). The AUC is computed exactly
    from ranks (Mann–Whitney U, ties counted half): the probability that a random positive image has a larger
    norm than a random negative one. It is not folded to max(AUC, 1 − AUC); it can fall below 0.5 when mean and
    ranks disagree. With no signal it is ≈ 0.5 (slightly above on average, since the positive class is chosen
    by the same norms).

    Args:
        grads: (n, ...) gradients, any float dtype.
        labels: (n,) int labels of exactly two distinct classes (restrict data with more classes first, e.g. to
            :func:`two_most_frequent_classes`).

    Returns:
        AUC in [0, 1].

    Raises:
        ValueError: bad shapes or values, mismatched lengths, not exactly two classes.
    """
    flat = _check_grads(grads)
    labels = _check_labels(labels, flat.shape[0])
    classes = torch.unique(labels)
    if len(classes) != 2:
        raise ValueError(f"norm_attack_auc needs exactly two classes, got {len(classes)}; restrict the data to "
                         "two classes first (two_most_frequent_classes).")
    norms = flat.norm(dim=1).numpy()
    lab = labels.numpy()
    a, b = classes.tolist()
    positive = a if norms[lab == a].mean() > norms[lab == b].mean() else b
    pos = lab == positive
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    from scipy.stats import rankdata

    ranks = rankdata(norms, method="average")  # 1-based, ties sharing the average of their ranks
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------------------------------------- probe


class LabelProbe:
    """What a user keeps of the gradients it received, to measure afterwards how much they leak the labels.

    It keeps the most recent gradient of each image id, for the first ``max_images`` distinct ids it ever sees
    (later new ids are ignored, so memory stays bounded: about max_images × C·H·W × 2 bytes). A gradient is kept
    on the CPU as its direction (the L2-normalised row, float16) and its L2 norm (float32): storing the raw
    float16 values would flush the provider's tiny gradients (~1e-6 per pixel and below) to zero, while both
    attacks need only directions and norms. :meth:`gradients` gives back direction × norm.
    """

    def __init__(self, max_images: int = 2000):
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise ValueError(f"max_images must be an integer ≥ 1, not {max_images!r}.")
        self.max_images = max_images
        self.shape: tuple[int, ...] | None = None  # the shape of one image's gradient, (C, H, W)
        self._slot: dict[int, int] = {}  # image id → row
        self._ids = torch.empty(0, dtype=torch.int64)
        self._directions = torch.empty(0, 0, dtype=torch.float16)
        self._norms = torch.empty(0, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self._slot)

    def observe(self, ids: Tensor, grad: Tensor) -> None:
        """Keep ``grad[i]`` as the latest gradient of image ``ids[i]``.

        Args:
            ids: (n,) int64 image ids (e.g. the sample ids of a training batch); a repeated id keeps its last row.
            grad: (n, C, H, W) the ∂L_class/∂x̂ the provider returned for those images, any float dtype/device;
                every call must give gradients of the same per-image shape.

        Raises:
            ValueError: mismatched lengths, non-integer ids, a per-image shape unlike earlier ones, non-finite
                values.
        """
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be a 1-D integer tensor, not {ids.dtype} of shape {tuple(ids.shape)}.")
        if not isinstance(grad, Tensor) or grad.dim() < 2 or grad.shape[0] != len(ids):
            shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            raise ValueError(f"grad must be a tensor of shape (n, C, H, W) with n = {len(ids)} ids, got {shape}.")
        if len(ids) == 0:
            return
        flat = _check_grads(grad)
        shape = tuple(grad.shape[1:])
        if self.shape is None:
            self.shape = shape
            self._directions = torch.empty(0, flat.shape[1], dtype=torch.float16)
        elif shape != self.shape:
            raise ValueError(f"gradient shape {shape} differs from the {self.shape} this probe already holds.")
        norms = flat.norm(dim=1)
        directions = _unit_rows(flat)
        rows, src, new_ids = [], [], []
        for i, image_id in enumerate(ids.tolist()):
            slot = self._slot.get(image_id)
            if slot is None:
                if len(self._slot) >= self.max_images:
                    continue
                slot = self._slot[image_id] = len(self._slot)
                new_ids.append(image_id)
            rows.append(slot)
            src.append(i)
        if new_ids:
            start = len(self._slot) - len(new_ids)
            self._grow(len(self._slot))
            self._ids[start:len(self._slot)] = torch.tensor(new_ids, dtype=torch.int64)
        if rows:  # index_copy_ with repeated rows is unordered: keep each row's last occurrence only
            last = {}
            for r, i in zip(rows, src):
                last[r] = i
            r_idx = torch.tensor(list(last.keys()), dtype=torch.int64)
            s_idx = torch.tensor(list(last.values()), dtype=torch.int64)
            self._directions[r_idx] = directions[s_idx].to(torch.float16)
            self._norms[r_idx] = norms[s_idx].to(torch.float32)

    def _grow(self, size: int) -> None:
        """Make room for ``size`` rows (storage grows by doubling, never beyond max_images)."""
        if size <= len(self._ids):
            return
        cap = min(self.max_images, max(size, 2 * len(self._ids), 64))
        grow = cap - len(self._ids)
        self._ids = torch.cat([self._ids, torch.full((grow,), -1, dtype=torch.int64)])
        self._directions = torch.cat([self._directions,
                                      torch.zeros(grow, self._directions.shape[1], dtype=torch.float16)])
        self._norms = torch.cat([self._norms, torch.zeros(grow, dtype=torch.float32)])

    def ids(self) -> Tensor:
        """(m,) int64 the ids held, in ascending order."""
        return torch.sort(self._ids[:len(self)]).values

    def gradients(self) -> tuple[Tensor, Tensor]:
        """(ids (m,) int64 ascending, gradients (m, C, H, W) float32) — the latest gradient of each id held."""
        m = len(self)
        order = torch.argsort(self._ids[:m])
        grads = self._directions[:m][order].float() * self._norms[:m][order, None]
        return self._ids[:m][order], grads.reshape(m, *(self.shape or (0,)))

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (loadable with ``torch.load(weights_only=True)``), rows in ascending id order."""
        m = len(self)
        order = torch.argsort(self._ids[:m])
        return {"max-images": torch.tensor(self.max_images, dtype=torch.int64),
                "shape": torch.tensor(self.shape or (), dtype=torch.int64),
                "ids": self._ids[:m][order].clone(),
                "directions": self._directions[:m][order].clone(),
                "norms": self._norms[:m][order].clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> LabelProbe:
        """The probe that :meth:`state_dict` described. Raises ValueError on a missing or inconsistent entry."""
        keys = ("max-images", "shape", "ids", "directions", "norms")
        if not isinstance(state, dict) or any(not isinstance(state.get(k), Tensor) for k in keys):
            raise ValueError(f"a LabelProbe state must be a dict of tensors with keys {list(keys)}.")
        ids, directions, norms, shape = state["ids"], state["directions"], state["norms"], state["shape"]
        m = len(ids)
        width = int(np.prod(shape.tolist())) if shape.numel() else 0
        if (ids.dtype != torch.int64 or ids.dim() != 1 or directions.dtype != torch.float16
                or tuple(directions.shape) != (m, width) or norms.dtype != torch.float32
                or tuple(norms.shape) != (m,) or len(torch.unique(ids)) != m or (m and not shape.numel())):
            raise ValueError("a LabelProbe state has inconsistent ids, directions, norms or shape.")
        probe = cls(int(state["max-images"].item()))
        if m > probe.max_images:
            raise ValueError(f"a LabelProbe state holds {m} images, more than its max_images {probe.max_images}.")
        if shape.numel():
            probe.shape = tuple(int(s) for s in shape.tolist())
        probe._ids, probe._directions, probe._norms = ids.clone(), directions.clone(), norms.clone()
        probe._slot = {int(i): s for s, i in enumerate(ids.tolist())}
        return probe

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (a temporary file, then a rename)."""
        save_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelProbe:
        """The probe saved at ``path`` (``torch.load(weights_only=True)``). Raises ValueError if it is not one."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load of a foreign file raises anything (KeyError, …)
            raise ValueError(f"cannot read a LabelProbe from '{path}': {exc!r}") from None
        return cls.from_state_dict(state)

    def report(self, labels_of: Callable[[Tensor], Tensor] | Tensor, n_classes: int, seed: int = 0) -> dict:
        """How well the attacks of Li et al. label the images from the gradients held.

        Args:
            labels_of: the true labels, used only to score the attacks (and as the attacker's 10 known labels
                per class): a function from ids (m,) int64 to labels (m,), or a tensor of labels indexed by id.
            n_classes: number of classes (≥ 2); labels must lie in [0, n_classes).
            seed: seed of the clustering and of the choice of known labels.

        Returns:
            A JSON-ready dict: ``n-images``, ``n-classes``, ``chance`` (1 / n_classes), ``direction-accuracy``
            (:func:`direction_attack` with n_classes clusters, scored by the best matching — an upper bound for
            an unsupervised attacker), ``known-10-accuracy`` (:func:`known_labels_attack` with 10 known labels
            per class present; None when a present class has ≤ 10 images), ``norm-auc`` (:func:`norm_attack_auc`
            on the two most frequent classes; None when fewer than two classes are present), ``source``.

        Raises:
            ValueError: fewer images held than classes, labels of the wrong length or out of range.
        """
        k = _check_n_classes(n_classes)
        ids, grads = self.gradients()
        if len(ids) < k:
            raise ValueError(f"the probe holds {len(ids)} images, fewer than the {k} classes; observe more "
                             "gradients first.")
        labels = labels_of(ids) if callable(labels_of) else torch.as_tensor(labels_of)[ids]
        labels = _check_labels(labels, len(ids))
        if labels.max().item() >= k:
            raise ValueError(f"labels must lie in [0, {k}), got {labels.max().item()}.")
        classes, counts = torch.unique(labels, return_counts=True)
        direction = best_match_accuracy(direction_attack(grads, k, seed=seed), labels, k)
        known = (known_labels_attack(grads, labels, KNOWN_PER_CLASS, seed=seed)
                 if len(classes) >= 2 and counts.min().item() > KNOWN_PER_CLASS else None)
        norm_auc = None
        if len(classes) >= 2:
            keep = torch.isin(labels, torch.tensor(two_most_frequent_classes(labels)))
            norm_auc = norm_attack_auc(grads[keep], labels[keep])
        return {"n-images": len(ids), "n-classes": k, "chance": 1.0 / k, "direction-accuracy": direction,
                "known-10-accuracy": known, "norm-auc": norm_auc, "source": SOURCE}


# ------------------------------------------------------------------------------------------------ summary


def summarise(reports: list[dict]) -> dict:
    """Mean, min and max of each metric across users' :meth:`LabelProbe.report` dicts.

    Returns ``{"n-users", "chance", "source", METRIC: {"mean", "min", "max", "n"} or None}`` for each metric in
    ``direction-accuracy``, ``known-10-accuracy``, ``norm-auc``; a user whose metric is None is left out of that
    metric (``n`` counts the users that have it), and a metric no user has is None. ``chance`` is the mean
    chance. Raises ValueError on an empty list or a report without the metric keys.
    """
    if not reports:
        raise ValueError("summarise needs at least one report.")
    for r in reports:
        if not isinstance(r, dict) or any(key not in r for key in (*METRICS, "chance")):
            raise ValueError(f"each report must be a dict with keys {['chance', *METRICS]}.")
    out: dict = {"n-users": len(reports), "chance": float(np.mean([r["chance"] for r in reports])),
                 "source": SOURCE}
    for key in METRICS:
        values = [float(r[key]) for r in reports if r[key] is not None]
        out[key] = ({"mean": float(np.mean(values)), "min": min(values), "max": max(values), "n": len(values)}
                    if values else None)
    return out


def format_table(reports: list[dict]) -> str:
    """A plain-text table: one row per user (``report["user"]`` if set, else its position) with its chance level,
    and a last row of means. Missing metrics print as ``-``."""
    summary = summarise(reports)

    def cell(value, width: int, digits: int = 3) -> str:
        text = "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
        return text.rjust(width)

    head = f"{'user':>6} {'images':>7} {'chance':>7} {'direction':>10} {'known-10':>9} {'norm-AUC':>9}"
    lines = [f"label leakage from the provider's gradients — {SOURCE}", head, "-" * len(head)]
    for i, r in enumerate(reports):
        lines.append(f"{cell(r.get('user', i), 6)} {cell(r.get('n-images'), 7)} {cell(r['chance'], 7)} "
                     f"{cell(r['direction-accuracy'], 10)} {cell(r['known-10-accuracy'], 9)} "
                     f"{cell(r['norm-auc'], 9)}")
    means = [None if summary[key] is None else summary[key]["mean"] for key in METRICS]
    lines.append("-" * len(head))
    lines.append(f"{'mean':>6} {'':>7} {cell(summary['chance'], 7)} {cell(means[0], 10)} {cell(means[1], 9)} "
                 f"{cell(means[2], 9)}")
    lines.append("direction: best one-to-one match of clusters to classes (an upper bound, unsupervised); "
                 "known-10: 10 labels known per class; norm-AUC: two most frequent classes")
    return "\n".join(lines)
