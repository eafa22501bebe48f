"""Images in, uint8 tensors out: CIFAR-10 / ImageFolder loading, the paper's split, user shards, augmentation.

All images are kept as ``uint8`` tensors of shape (N, 3, H, W) and turned into float [0, 1] only per batch.
Every image file — of a data set, of ``ppflower protect`` and of ``ppflower classify`` — is decoded by
:func:`read_image`, and every folder of images is listed by :func:`image_files`.

Decoded datasets are cached on disk (``PPFLOWER_CACHE_DIR``, default ``~/.cache/pp_flower``) and in this
module's memory, so a second load costs well under a second (and Ray workers decode only once). The cache key
covers every image file's path, size, modification and change time, so an image rewritten in place is decoded
again; deleting the cache folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from pp_flower.errors import PPFlowerError
from pp_flower.seeds import generator

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# torchvision's ImageFolder extensions (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp), GIF and JPEG's other names;
# PIL decodes all of them (tests/test_inputs_data.py writes and reads each). Matched case-insensitively.
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif", ".jfif", ".jpe")
# image formats a user may have that pp-flower does not read (PIL's other formats, and those PIL cannot open): a file
# of one is refused by name, never skipped, so no image silently drops out of a class or of `ppflower protect`
_OTHER_IMAGE_FORMATS = (".heic", ".heif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf",
                        ".rw2", ".exr", ".xcf")
# folders that operating systems and tools leave in a tree, never classes (besides hidden ones: names starting with .)
NOT_CLASS_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "lost+found"})
# files that operating systems leave beside images, never worth a mention
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
DATA_HELP = (
    "Supply an ImageFolder tree with train/<class>/*.jpg and test/<class>/*.jpg via --data-dir or "
    "the PPFLOWER_DATA_DIR environment variable, or leave both unset to download CIFAR-10 with torchvision."
)
# part of every data set's cache key: bump it when read_image decodes any file differently
DECODER_VERSION = 3

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


def accepted_extensions() -> str:
    return " ".join(IMAGE_EXTENSIONS)


def _visible(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, AppleDouble ``._x.jpg``) and system folders are no
    data."""
    return not name.startswith(".") and name not in NOT_CLASS_FOLDERS


def _unread_image_extensions() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    pil = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return tuple(sorted((pil | set(_OTHER_IMAGE_FORMATS)) - set(IMAGE_EXTENSIONS)))


def _scan(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Names of ``folder``'s images (files with an accepted extension, symlinks followed, sorted) and of its other
    visible entries (files that are not images, subfolders — not searched), for messages. Images of a format not
    read and broken links named as images are refused. Strings, not Paths: a data set is listed on every load (for
    its cache key), and 60,000 Paths cost more than the listing."""
    images, others, unread, broken = [], [], [], []
    unread_extensions = None
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if not _visible(name) or name.lower() in SYSTEM_FILES:
                continue
            if entry.is_dir():
                others.append(name + "/")
            elif has_file_allowed_extension(name, IMAGE_EXTENSIONS):
                (images if entry.is_file() else broken).append(name)
            else:
                unread_extensions = unread_extensions or _unread_image_extensions()
                (unread if has_file_allowed_extension(name, unread_extensions) else others).append(name)
    if broken:
        raise PPFlowerError(f"{Path(folder) / broken[0]}{f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''} "
                            "is a link to a file that does not exist; restore its target or remove the link.")
    if unread:
        raise PPFlowerError(f"{folder} holds images of a format pp-flower does not read: {', '.join(unread[:5])}"
                            f"{' …' if len(unread) > 5 else ''} (accepted: {accepted_extensions()}); convert them to "
                            "PNG or JPEG, or move them out.")
    return images, others


def image_files(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The images of ``folder`` — as a data set's class folder is read — and the names of its other visible entries."""
    images, others = _scan(folder)
    return [Path(folder) / name for name in images], others


def describe_others(others: list[str]) -> str:
    """' (it holds a.heic, notes.txt, …)' for a message about a folder without images; '' when it holds nothing."""
    if not others:
        return " (it is empty)"
    return f" (it holds {', '.join(others[:5])}{', …' if len(others) > 5 else ''})"


# an ImageFolder tree as listed: class names, and each class's image file names
Listing = tuple[tuple[str, ...], list[list[str]]]


def _scan_tree(root: Path) -> Listing:
    """Class names and each class's images: one class per visible folder, each with at least one image."""
    if not root.is_dir():
        raise PPFlowerError(f"Data directory {root} does not exist. {DATA_HELP}")
    with os.scandir(root) as entries:
        classes = tuple(sorted(e.name for e in entries if _visible(e.name) and e.is_dir()))
    if not classes:
        raise PPFlowerError(f"No images found under {root}: it has no class folders (expected {root}/<class>/*.jpg "
                            f"or another image file). {DATA_HELP}")
    per_class = []
    for name in classes:
        images, others = _scan(root / name)
        if not images:
            raise PPFlowerError(
                f"No images found in class folder {root / name}{describe_others(others)}; accepted: "
                f"{accepted_extensions()} (any case; hidden files are ignored, subfolders are not searched). Add "
                "images to it or remove it: every folder is a class."
            )
        per_class.append(images)
    return classes, per_class


def _list_image_folder(root: Path, listing: Listing | None = None) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files, labels and class names of an ImageFolder tree (see :func:`_scan_tree`)."""
    classes, per_class = listing or _scan_tree(root)
    files: list[Path] = []
    labels: list[int] = []
    for label, (name, images) in enumerate(zip(classes, per_class)):
        folder = root / name
        files += [folder / f for f in images]
        labels += [label] * len(images)
    return files, labels, classes


def _refuse(path, mode: str, why: str) -> PPFlowerError:
    return PPFlowerError(f"Cannot use image {path} (mode {mode}): {why}.")


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_RGB_CONVERTIBLE = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "PA")


def _to_rgb(img, path):
    """A decoded PIL image of any mode → (H, W, 3) uint8, as an image viewer shows it: 16-bit grey scaled to 8 bits,
    transparent pixels over white; modes without a defined range (32-bit integer or float) are refused."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    # 16-bit grey (PNG, TIFF; PGM with maxval > 255, which PIL scales to 0..65535 as mode I): 0..65535 → 0..255
    if mode in _SIXTEEN_BIT or (mode == "I" and img.format in ("PNG", "PPM")):
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "32-bit floating-point"
        raise _refuse(path, mode, f"a {kind} image has no defined black and white to map to 8 bits; save it as an "
                                  "8- or 16-bit PNG")
    if mode in _WITH_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in _RGB_CONVERTIBLE:
        return np.array(img.convert("RGB"))
    raise _refuse(path, mode, "pp-flower cannot convert this mode to RGB; save the image as an 8-bit RGB PNG or JPEG")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file → uint8 RGB tensor (3, H, W), as an image viewer shows it (PIL).

    Every mode is converted to 8-bit RGB (16-bit grey scaled, transparency over white, EXIF orientation applied) or
    refused; a damaged file, an animation or a multi-page file is one :class:`PPFlowerError` naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":  # MPO: a camera JPEG with previews; the first frame is the photo
                raise PPFlowerError(f"Cannot use image {path}: it holds {frames} frames (an animation or a multi-page "
                                    "file); save the frame you mean as its own PNG or JPEG.")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img, path)
    except PPFlowerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        if isinstance(exc, Image.DecompressionBombError):
            raise PPFlowerError(f"Cannot use image {path}: it is too large to decode safely ({exc}); downscale it."
                                ) from None
        if isinstance(exc, UnidentifiedImageError):
            reason = "no image format PIL knows"
        else:
            reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PPFlowerError(f"Cannot decode image {path} ({reason}): the file is damaged or not an image of its "
                            "kind; re-save it as PNG or JPEG, or remove it.") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _size(shape) -> str:
    return f"{shape[-1]}×{shape[-2]}"


def _decode_files(files: list[Path], desc: str) -> torch.Tensor:
    from pp_flower.progress import track

    out = []
    for f in track(files, desc):
        img = read_image(f)
        if out and img.shape != out[0].shape:
            raise PPFlowerError(
                f"Image {f} is {_size(img.shape)}, but {files[0]} (and the {len(out) - 1} after it) are "
                f"{_size(out[0].shape)}: all images of a data set must share one size; resize them or move the odd "
                "ones out."
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
        except Exception:  # noqa: BLE001 - a half-written or stale cache is rebuilt, never trusted
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


def _folder_key(root: Path, listing: Listing | None = None) -> str:
    """Cache key of an ImageFolder tree: its path, the decoder's version and every image's relative path, size,
    inode and modification and change times (ns) — an image rewritten in place (even with its old mtime restored,
    as ``cp -p`` and ``rsync -a`` do) changes the key. About 0.2 s for CIFAR-10's 60,000 files."""
    classes, per_class = listing or _scan_tree(root)
    h = hashlib.sha256(f"{DECODER_VERSION}\0{root.resolve()}\n".encode())
    for name, images in zip(classes, per_class):
        folder = os.path.join(root, name)
        for f in images:
            st = os.stat(os.path.join(folder, f))
            h.update(f"{name}/{f}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return f"imagefolder-v{DECODER_VERSION}-{h.hexdigest()[:24]}"


def load_image_folder(root: Path, listing: Listing | None = None) -> ImageSet:
    """Decode an ImageFolder tree into an :class:`ImageSet` (cached on disk and in memory)."""
    listing = listing or _scan_tree(root)

    def build() -> ImageSet:
        files, labels, classes = _list_image_folder(root, listing)
        images = _decode_files(files, f"Decoding {root}")
        return ImageSet(images, torch.tensor(labels, dtype=torch.long), classes)

    return _load_cached(_folder_key(root, listing), build)


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
    listings = {part: _scan_tree(root / part) for part in ("train", "test")}  # cheap: nothing decoded yet
    train_classes, test_classes = listings["train"][0], listings["test"][0]
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise PPFlowerError(f"{root}: train/ and test/ must have the same class folders; only in train/: "
                            f"{', '.join(only_train) or '—'}; only in test/: {', '.join(only_test) or '—'}. "
                            f"{DATA_HELP}")
    if len(train_classes) < 2:
        raise PPFlowerError(f"{root}: {len(train_classes)} class folder(s) ({', '.join(train_classes)}); a classifier "
                            f"needs at least 2 classes. {DATA_HELP}")
    train, test = (load_image_folder(root / part, listings[part]) for part in ("train", "test"))
    if train.images.shape[-2:] != test.images.shape[-2:]:
        raise PPFlowerError(f"{root}: the train/ images are {_size(train.images.shape)} but the test/ images are "
                            f"{_size(test.images.shape)}; both splits must share one size (resize one of them).")
    return train, test


def stratified_split(labels: torch.Tensor, val_fraction: float = 0.1,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
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
    dev = images.device  # the draws come from the CPU generator, so a batch is the same on every device
    out = images
    if crop:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        out = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


def dataset_fingerprint(*images: torch.Tensor) -> str:
    """What identifies the images a result was computed on: SHA-256 of their uint8 pixels, shapes and order
    (never their labels). Each subset a run trains or evaluates on is hashed as given, so the data set, every
    limit (``limit_train``, ``limit_eval``), the split's seed and any change of the files show; the resume keys
    of train-classifier, train-gan, attack, reproduce's stages and the Flower app's users include it.
    About 0.15 s per 150 MB (all of CIFAR-10's training images)."""
    digest = hashlib.sha256()
    for tensor in images:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(memoryview(t.numpy()).cast("B"))
    return f"sha256:{digest.hexdigest()[:32]}"


_INDEX_FINGERPRINTS: dict[tuple, str] = {}


def _listing_key(root: Path) -> tuple:
    """What can change a tree's listing: the modification time of each part and class folder (a file added,
    removed or renamed changes its folder's). ~20 stat calls, where hashing every file's stat took 0.2 s a part —
    paid by every user's setup, 1,000 times in a run with 1,000 users."""
    key = [str(root.resolve())]
    for part in ("train", "test"):
        folder = root / part
        with os.scandir(folder) as entries:
            dirs = sorted((e.name, e.stat().st_mtime_ns) for e in entries if e.is_dir())
        key += [part, folder.stat().st_mtime_ns, *dirs]
    return tuple(key)


def index_fingerprint(data_dir: str | os.PathLike | None = None) -> str:
    """What sample ids index, for provider and users to compare at setup: per part (train, test) the image count and
    a hash of the file names in index order — never labels, never pixels. Two data sets with the same fingerprint
    give every id the same image file; torchvision's CIFAR-10 (no data dir) is one fixed set."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return "torchvision-cifar10"
    for part in ("train", "test"):
        if not (root / part).is_dir():
            _scan_tree(root / part)  # its one-line error
    key = _listing_key(root)
    if key not in _INDEX_FINGERPRINTS:
        parts = []
        for part in ("train", "test"):
            files, _, _ = _list_image_folder(root / part)
            digest = hashlib.sha256("\0".join(f.name for f in files).encode()).hexdigest()[:16]
            parts.append(f"{part}:{len(files)}:{digest}")
        _INDEX_FINGERPRINTS[key] = " ".join(parts)
    return _INDEX_FINGERPRINTS[key]
