"""Images in, uint8 tensors out: CIFAR-10 / ImageFolder loading, the paper's split, user shards, augmentation.

All images are kept as ``uint8`` tensors of shape (N, 3, H, W) and turned into float [0, 1] only per batch.
Decoded datasets are cached on disk (``PPFLOWER_CACHE_DIR``, default ``~/.cache/pp_flower``) and in this
module's memory, so a second load costs well under a second (and Ray workers decode only once).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pp_flower.errors import PPFlowerError
from pp_flower.seeds import generator

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DATA_HELP = (
    "Supply an ImageFolder tree with train/<class>/*.jpg and test/<class>/*.jpg via --data-dir or "
    "the PPFLOWER_DATA_DIR environment variable, or leave both unset to download CIFAR-10 with torchvision."
)

_MEMORY_CACHE: dict[str, "ImageSet"] = {}


@dataclass
class ImageSet:
    """Images (N, 3, H, W) uint8 and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices], self.classes)


@dataclass
class Splits:
    """The paper's split: train (45k) / validation (5k) from CIFAR-10's training set, test (10k).

    ``*_ids`` index the full sets (``train_all`` for train and val, ``test_all`` for test): they are the
    sample ids the provider and users exchange instead of images or labels.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    train_all: ImageSet
    test_all: ImageSet
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    test_ids: torch.Tensor


def cache_dir() -> Path:
    return Path(os.environ.get("PPFLOWER_CACHE_DIR", Path.home() / ".cache" / "pp_flower"))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``PPFLOWER_DATA_DIR``, else None (meaning: torchvision CIFAR-10)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("PPFLOWER_DATA_DIR") or None
    return Path(data_dir).expanduser() if data_dir else None


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    if not root.is_dir():
        raise PPFlowerError(f"Data directory {root} does not exist. {DATA_HELP}")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise PPFlowerError(
            f"No images found under {root} (expected {root}/<class>/*.jpg or *.png). {DATA_HELP}"
        )
    return files, labels, classes


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file → uint8 RGB tensor (3, H, W), decoded as torchvision's ImageFolder does (PIL)."""
    import numpy as np
    from torchvision.datasets.folder import pil_loader

    try:
        return torch.from_numpy(np.array(pil_loader(str(path)))).permute(2, 0, 1)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise PPFlowerError(f"Cannot decode image {path}: {exc}") from exc


def _decode_files(files: list[Path], desc: str) -> torch.Tensor:
    from pp_flower.progress import track

    out = []
    shape = None
    for f in track(files, desc):
        img = read_image(f)
        if shape is None:
            shape = img.shape
        elif img.shape != shape:
            raise PPFlowerError(
                f"Image {f} has shape {tuple(img.shape)}, expected {tuple(shape)} like the others; "
                "all images of a data set must share one size."
            )
        out.append(img)
    return torch.stack(out)


def _load_cached(key: str, build) -> ImageSet:
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = cache_dir() / f"{key}.pt"
    if path.exists():
        try:
            # memory-mapped: a process that needs a few batches (a deployed ClientApp handles one message and
            # exits) reads only those pages instead of the whole file
            blob = torch.load(path, weights_only=True, mmap=True)
            result = ImageSet(blob["images"], blob["labels"], tuple(blob["classes"]))
        except Exception:  # a half-written or stale cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
            result = None
        if result is not None:
            _MEMORY_CACHE[key] = result
            return result
    result = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": result.images, "labels": result.labels, "classes": list(result.classes)}, tmp)
    os.replace(tmp, path)
    _MEMORY_CACHE[key] = result
    return result


def _folder_key(root: Path) -> str:
    """Cheap cache key: the tree's path and each class folder's name, entry count and mtime.

    Adding, removing or renaming images changes a folder's mtime; rewriting an image in place does not
    (delete the cache dir, ``PPFLOWER_CACHE_DIR``, after doing that).
    """
    if not root.is_dir():
        raise PPFlowerError(f"Data directory {root} does not exist. {DATA_HELP}")
    h = hashlib.sha256(str(root.resolve()).encode())
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        st = sub.stat()
        h.update(f"{sub.name}\0{st.st_mtime_ns}\0{sum(1 for _ in os.scandir(sub))}\n".encode())
    return f"imagefolder-v2-{h.hexdigest()[:20]}"


def load_image_folder(root: Path) -> ImageSet:
    """Decode an ImageFolder tree into an :class:`ImageSet` (cached on disk and in memory)."""

    def build() -> ImageSet:
        files, labels, classes = _list_image_folder(root)
        images = _decode_files(files, f"Decoding {root}")
        return ImageSet(images, torch.tensor(labels, dtype=torch.long), classes)

    return _load_cached(_folder_key(root), build)


def load_torchvision_cifar10(train: bool) -> ImageSet:
    def build() -> ImageSet:
        from torchvision.datasets import CIFAR10

        root = cache_dir() / "torchvision"
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - offline machines land here
            raise PPFlowerError(f"Could not download CIFAR-10 into {root} ({exc}). {DATA_HELP}") from exc
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes))

    return _load_cached(f"cifar10-{'train' if train else 'test'}", build)


def load_datasets(data_dir: str | os.PathLike | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets from an ImageFolder tree (``data_dir`` / env) or torchvision's CIFAR-10."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return load_torchvision_cifar10(True), load_torchvision_cifar10(False)
    if not root.is_dir():
        raise PPFlowerError(f"Data directory {root} does not exist. {DATA_HELP}")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise PPFlowerError(f"Data directory {root} has no '{part}/' folder. {DATA_HELP}")
    train, test = load_image_folder(root / "train"), load_image_folder(root / "test")
    if train.classes != test.classes:
        raise PPFlowerError(f"{root}: train/ and test/ have different class folders. {DATA_HELP}")
    if len(train.classes) < 2:
        raise PPFlowerError(f"{root}: {len(train.classes)} class folder(s) ({', '.join(train.classes)}); a classifier "
                            f"needs at least 2 classes. {DATA_HELP}")
    return train, test


def stratified_split(labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): ``val_fraction`` of every class goes to validation, chosen with ``seed``.

    Both index lists come in a seeded random order (not class order), so their first N entries are a
    random, roughly class-balanced subset — that is what ``limit_train`` / ``limit_eval`` take.
    """
    g = generator(seed, "split")
    train_idx, val_idx = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train, val = torch.cat(train_idx), torch.cat(val_idx)
    return train[torch.randperm(len(train), generator=g)], val[torch.randperm(len(val), generator=g)]


def load_splits(data_dir=None, val_fraction: float = 0.1, seed: int = 0, limit_train: int | None = None,
                limit_eval: int | None = None) -> Splits:
    """The paper's 45,000 / 5,000 / 10,000 split (stratified, seeded).

    ``limit_train`` keeps the first N training images, ``limit_eval`` the first N validation and test images
    of their seeded random order (CPU-sized runs).
    """
    train_all, test_all = load_datasets(data_dir)
    tr, va = stratified_split(train_all.labels, val_fraction, seed)
    te = torch.randperm(len(test_all), generator=generator(seed, "test-order"))
    if limit_train:
        tr = tr[:limit_train]
    if limit_eval:
        va, te = va[:limit_eval], te[:limit_eval]
    return Splits(train_all.subset(tr), train_all.subset(va), test_all.subset(te), train_all, test_all, tr, va, te)


def user_shards(n_samples: int, num_users: int, partition: str = "iid", seed: int = 0) -> list[torch.Tensor]:
    """Indices of each user's images: ``iid`` = disjoint random equal shards, ``full`` = every user gets all."""
    if partition == "full":
        return [torch.arange(n_samples) for _ in range(num_users)]
    if partition != "iid":
        raise PPFlowerError(f"Unknown partition '{partition}' (expected 'iid' or 'full').")
    perm = torch.randperm(n_samples, generator=generator(seed, "shards"))
    return [torch.sort(s).values for s in torch.tensor_split(perm, num_users)]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float32 in [0, 1]."""
    return images.float().div_(255.0)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
            crop: bool = True) -> torch.Tensor:
    """The paper's augmentation, per image: random crop with zero padding ``pad`` and horizontal flip."""
    n, _, h, w = images.shape
    out = images
    if crop:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(images.shape[1])[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out
