"""Issue 23, kinds 1-5: what a user's folders and image files can hold, and what pp-flower makes of them.

Every image goes through one decoder (``pp_flower.data.read_image``), for data sets, ``protect`` and ``classify``;
a folder's images are listed by one function (``pp_flower.data.image_files``). Each test builds the failing input
(or a smaller one of its kind) in a temporary folder and asserts the right behaviour: a correct result, or one
``PPFlowerError`` line naming the file or folder and the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pp_flower.data as data
from pp_flower.errors import PPFlowerError

ROOT = Path(__file__).resolve().parents[1]
# torchvision's IMG_EXTENSIONS, GIF (single-frame) and JPEG's other names
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".jfif", ".jpe")
JPEG = (".jpg", ".jpeg", ".jfif", ".jpe")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPFLOWER_CACHE_DIR", str(tmp_path / "cache"))
    data._MEMORY_CACHE.clear()
    yield
    data._MEMORY_CACHE.clear()


def _rgb(seed: int, size=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _save(path: Path, seed: int = 0, size=(8, 8), fmt: str | None = None) -> np.ndarray:
    """A random RGB image (H, W, 3), saved losslessly where the format allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = _rgb(seed, size)
    suffix = path.suffix.lower()
    kwargs = {"lossless": True} if suffix == ".webp" else {"quality": 100, "subsampling": 0} if suffix in JPEG else {}
    Image.fromarray(a).save(path, format=fmt or ("JPEG" if suffix in JPEG else None), **kwargs)
    return a


def _tree(root: Path, layout: dict[str, dict[str, int]], size=(8, 8), ext=".png") -> Path:
    seed = 0
    for part, classes in layout.items():
        for name, n in classes.items():
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                _save(root / part / name / f"{i}{ext}", seed, size)
    return root


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _cli(*args, env=None, timeout=900):  # seconds here; minutes on a 2-core box shared with training runs
    return subprocess.run([sys.executable, "-m", "cli.ppflower", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# ---------------------------------------------------------------- kind 1: folders that are not classes


def test_kind1_hidden_and_system_folders_are_not_classes(tmp_path):
    """`.ipynb_checkpoints/` beside one real class made two classes (and accuracy 1.0); now: one class, refused."""
    root = _tree(tmp_path / "d", {"train": {"cat": 3, ".ipynb_checkpoints": 2},
                                  "test": {"cat": 2, ".ipynb_checkpoints": 1}})
    with pytest.raises(PPFlowerError, match="needs at least 2 classes") as exc:
        data.load_datasets(root)
    assert ".ipynb_checkpoints" not in _one_line(exc)


def test_kind1_junk_a_user_may_have_is_ignored(tmp_path):
    """macOS/Windows/Jupyter/Synology leftovers: hidden files and folders, AppleDouble `._x.png` files (not images),
    `__MACOSX/`, `Thumbs.db`, `desktop.ini`, `@eaDir/` — none is a class or an image."""
    root = _tree(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    for part in ("train", "test"):
        (root / part / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        for junk in ("__MACOSX/cat", "@eaDir", ".Trash-1000"):
            (root / part / junk).mkdir(parents=True)
            (root / part / junk / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
        for name in ("cat", "dog"):
            (root / part / name / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")  # hidden, named like an image
            (root / part / name / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
            (root / part / name / "desktop.ini").write_text("[.ShellClassInfo]")
            (root / part / name / ".ipynb_checkpoints").mkdir()
    train, test = data.load_datasets(root)
    assert train.classes == test.classes == ("cat", "dog")
    assert (len(train), len(test)) == (4, 2)


def test_kind1_a_class_folder_without_images_is_refused(tmp_path):
    """An empty class folder became an output of ψ; a class of only unreadable files became an empty class."""
    root = _tree(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1, "bird": 1}})
    (root / "train" / "bird").mkdir()
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    msg = _one_line(exc)
    assert str(root / "train" / "bird") in msg and "no images" in msg.lower()
    assert all(ext in msg for ext in (".jpg", ".png", ".webp", ".tiff"))  # the accepted extensions are listed
    (root / "train" / "bird" / "0.heic").write_bytes(b"not decodable here")
    (root / "train" / "bird" / "notes.txt").write_text("birds")
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    assert "0.heic" in _one_line(exc)  # what the folder does hold is named


def test_kind1_every_accepted_extension_decodes(tmp_path):
    """A class whose images are all .webp (or .tif, .bmp, .gif, upper-case .PNG …) is a class with those images."""
    layout = {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}
    root = _tree(tmp_path / "d", layout)
    expected = {}
    for i, ext in enumerate(EXTENSIONS + (".PNG", ".JPEG", ".Tif")):
        if ext.lower() in (".pgm",):  # grey: written from the L channel below
            f = root / "train" / "b" / f"x{i}{ext}"
            Image.fromarray(_rgb(100 + i)[..., 0]).save(f)
            expected[f.name] = np.repeat(_rgb(100 + i)[..., :1], 3, axis=2)
            continue
        expected[f"x{i}{ext}"] = _save(root / "train" / "b" / f"x{i}{ext}", 100 + i)
    for name, want in expected.items():
        got = data.read_image(root / "train" / "b" / name).permute(1, 2, 0).numpy().astype(int)
        tol = 4 if Path(name).suffix.lower() in JPEG else 12 if name.endswith(".gif") else 0  # mean: lossy, 256 colours
        assert got.shape == want.shape and np.abs(got - want).mean() <= tol, name
    train, _ = data.load_datasets(root)
    assert int((train.labels == 1).sum()) == 1 + len(expected)  # not one file of class b dropped


@pytest.mark.parametrize("name", ["photo.heic", "scan.psd", "logo.avif", "raw.dng"])
def test_kind1_an_image_of_a_format_not_read_is_refused_not_skipped(tmp_path, name):
    """Beside readable images, an iPhone .heic (or .psd, .avif, a camera raw) was silently left out of its class."""
    root = _tree(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (root / "train" / "dog" / name).write_bytes(b"\0" * 64)
    (root / "train" / "dog" / "notes.txt").write_text("a note is not an image: ignored")
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    msg = _one_line(exc)
    assert str(root / "train" / "dog") in msg and name in msg and ".png" in msg


def test_kind1_a_broken_link_named_as_an_image_is_refused(tmp_path):
    """A data set checked out without its files (git-annex, DVC: links to nothing) lost those images silently."""
    root = _tree(tmp_path / "d", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (root / "train" / "cat" / "9.png").symlink_to(tmp_path / "annex" / "missing-object")
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    assert str(root / "train" / "cat" / "9.png") in _one_line(exc)


def test_kind1_a_symlinked_class_folder_is_a_class(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"cat": 2}, "test": {"cat": 1, "dog": 1}})
    elsewhere = _tree(tmp_path / "e", {"x": {"dogs": 3}})
    (root / "train" / "dog").symlink_to(elsewhere / "x" / "dogs", target_is_directory=True)
    train, _ = data.load_datasets(root)
    assert train.classes == ("cat", "dog") and int((train.labels == 1).sum()) == 3


def test_kind1_cli_refuses_a_notebook_checkpoint_class(tmp_path):
    """The issue's command: `train-classifier` on train/{cat,.ipynb_checkpoints} exited 0 with accuracy 1.0."""
    root = _tree(tmp_path / "d", {"train": {"cat": 4, ".ipynb_checkpoints": 4},
                                  "test": {"cat": 2, ".ipynb_checkpoints": 2}})
    proc = _cli("train-classifier", "--epochs", 1, "--batch-size", 2, "--data-dir", root, "--out", tmp_path / "c",
                env={"PPFLOWER_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs at least 2 classes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c" / "best.pt").exists()


# --------------------------------------------------------------------- kind 2: image modes decoded wrongly


def _grey16() -> np.ndarray:
    return np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)


def _grey8(g16: np.ndarray) -> np.ndarray:
    return np.repeat(((g16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)


def _png16_rgb(path: Path, a: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _mode_cases(tmp: Path) -> dict[str, tuple[Path, np.ndarray, int]]:
    """name → (file, the RGB a viewer shows, tolerance)."""
    rgb = _rgb(7, (16, 16))
    g16 = _grey16()
    cases = {}

    def put(name, img, suffix, want, tol=0, **kw):
        f = tmp / f"{name}{suffix}"
        img.save(f, **kw)
        cases[name] = (f, want, tol)

    put("16-bit grey PNG (I;16)", Image.fromarray(g16), ".png", _grey8(g16))
    put("16-bit grey TIFF (I;16)", Image.fromarray(g16), ".tif", _grey8(g16))
    pgm = tmp / "16-bit PGM (I).pgm"
    pgm.write_bytes(b"P5\n16 16\n65535\n" + g16.astype(">u2").tobytes())
    cases["16-bit PGM (I)"] = (pgm, _grey8(g16), 0)
    rgb16 = (rgb.astype(np.uint16) * 257)
    _png16_rgb(tmp / "rgb16.png", rgb16)
    cases["16-bit RGB PNG"] = (tmp / "rgb16.png", rgb, 0)
    grey = rgb[..., 0]
    put("grey PNG (L)", Image.fromarray(grey), ".png", np.repeat(grey[..., None], 3, axis=2))
    put("grey JPEG (L)", Image.fromarray(grey), ".jpg", np.repeat(grey[..., None], 3, axis=2), 8, quality=95)
    bits = grey > 127
    put("1-bit PNG (1)", Image.fromarray(bits), ".png", np.repeat(bits[..., None] * np.uint8(255), 3, axis=2))
    pal = Image.fromarray(rgb).quantize(16)
    put("palette PNG (P)", pal, ".png", np.array(pal.convert("RGB")))
    put("palette GIF (P)", pal, ".gif", np.array(pal.convert("RGB")))
    put("palette BMP (P)", pal, ".bmp", np.array(pal.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    put("CMYK TIFF", cmyk, ".tif", np.array(cmyk.convert("RGB")))
    put("CMYK JPEG", cmyk, ".jpg", np.array(cmyk.convert("RGB")), 8, quality=95)
    from PIL import ImageCms  # PIL converts RGB → LAB only through a colour profile

    lab = ImageCms.applyTransform(Image.fromarray(rgb), ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"))
    put("CIELab TIFF (LAB)", lab, ".tif", np.array(lab.convert("RGB")))  # sRGB → 8-bit Lab itself loses up to 26
    # transparency: opaque pixels as they are, transparent ones as a viewer shows them on white
    alpha = np.full((16, 16), 255, np.uint8)
    alpha[:, :8] = 0
    shown = rgb.copy()
    shown[:, :8] = 255
    put("RGBA PNG", Image.fromarray(np.dstack([rgb, alpha])), ".png", shown)
    put("RGBA WebP", Image.fromarray(np.dstack([rgb, alpha])), ".webp", shown, lossless=True)
    la_shown = np.repeat(grey[..., None], 3, axis=2).copy()
    la_shown[:, :8] = 255
    put("grey+alpha PNG (LA)", Image.fromarray(np.dstack([grey, alpha]), "LA"), ".png", la_shown)
    trns = Image.fromarray(rgb).quantize(16)
    trns.info["transparency"] = 0
    want = np.array(trns.convert("RGB"))
    want[np.array(trns) == 0] = 255
    put("palette PNG with transparency (P + tRNS)", trns, ".png", want, transparency=0)
    return cases


def test_kind2_every_image_mode_decodes_as_a_viewer_shows_it(tmp_path):
    """A 16-bit PNG read back all 255 (a gradient came back 99.6 % white); every mode now decodes right."""
    wrong = []
    for name, (f, want, tol) in _mode_cases(tmp_path).items():
        got = data.read_image(f)
        assert got.dtype == torch.uint8 and got.shape == (3, 16, 16), name
        err = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max()
        if err > tol:
            wrong.append(f"{name}: max error {err}")
    assert not wrong, wrong


@pytest.mark.parametrize("mode", ["F", "I"])
def test_kind2_modes_without_a_defined_range_are_refused_with_file_and_mode(tmp_path, mode):
    """32-bit float / integer TIFFs have no defined 0..max: one line naming the file and its mode."""
    f = tmp_path / f"scan-{mode}.tif"
    values = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray(values.astype(np.float32) if mode == "F" else (values * 1e6).astype(np.int32)).save(f)
    with pytest.raises(PPFlowerError) as exc:
        data.read_image(f)
    msg = _one_line(exc)
    assert str(f) in msg and f"mode {mode}" in msg


def test_kind2_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation reads upright, as every viewer shows it."""
    from PIL import ImageOps

    stored = Image.fromarray(_rgb(3, (16, 8)))  # 16 wide, 8 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    f = tmp_path / "photo.jpg"
    stored.save(f, exif=exif, quality=95)
    got = data.read_image(f)
    want = np.array(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))
    assert tuple(got.shape) == (3, 16, 8)
    assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max() == 0


@pytest.mark.parametrize("kind", ["truncated JPEG", "truncated PNG", "empty file", "text named .png",
                                  "animated GIF", "animated PNG"])
def test_kind2_broken_or_ambiguous_files_are_one_line_naming_the_file(tmp_path, kind):
    f = tmp_path / ("img.jpg" if "JPEG" in kind else "img.gif" if "GIF" in kind else "img.png")
    if kind.startswith("truncated"):
        _save(f.with_suffix(".full" + f.suffix), 1, (64, 64), fmt="JPEG" if "JPEG" in kind else "PNG")
        full = f.with_suffix(".full" + f.suffix).read_bytes()
        f.write_bytes(full[: len(full) // 2])
    elif kind == "empty file":
        f.write_bytes(b"")
    elif kind == "text named .png":
        f.write_text("this is not an image\n")
    else:
        frames = [Image.fromarray(_rgb(s, (8, 8))) for s in range(3)]
        frames[0].save(f, save_all=True, append_images=frames[1:])
    with pytest.raises(PPFlowerError) as exc:
        data.read_image(f)
    msg = _one_line(exc)
    assert str(f) in msg
    if kind.startswith("animated"):
        assert "3 frames" in msg


def test_kind2_datasets_protect_and_classify_decode_alike(tmp_path, tiny_transform):
    """The one decoder serves all three: a 16-bit grey PNG and the same image as 8-bit give the same results."""
    from pp_flower.evaluation import protect_folder

    g16 = _grey16()
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(g16).save(plain / "a16.png")
    Image.fromarray(_grey8(g16)[..., 0]).save(plain / "a8.png")
    assert protect_folder(tiny_transform, plain, tmp_path / "out") == 2
    a16, a8 = data.read_image(tmp_path / "out" / "a16.png"), data.read_image(tmp_path / "out" / "a8.png")
    assert torch.equal(a16, a8)
    root = tmp_path / "d"
    for part in ("train", "test"):
        for c in ("a", "b"):
            (root / part / c).mkdir(parents=True)
            Image.fromarray(g16).save(root / part / c / "0.png")
    train, _ = data.load_datasets(root)
    assert torch.equal(train.images[0], data.read_image(plain / "a8.png"))


# --------------------------------------------------------------------- kind 3: sizes across splits


def test_kind3_train_and_test_sizes_must_match(tmp_path):
    """32×32 train and 64×64 test trained fully, then every test reply was refused: now refused when loading."""
    root = _tree(tmp_path / "d", {"train": {"a": 2, "b": 2}}, size=(32, 32))
    _tree(root, {"test": {"a": 1, "b": 1}}, size=(64, 64))
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    msg = _one_line(exc)
    assert "32×32" in msg and "64×64" in msg and "train" in msg and "test" in msg


def test_kind3_mixed_sizes_within_a_split_name_the_file(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=(32, 32))
    _save(root / "train" / "b" / "big.png", 9, (48, 40))
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    msg = _one_line(exc)
    assert str(root / "train" / "b" / "big.png") in msg and "48×40" in msg and "32×32" in msg


def test_kind3_class_sets_must_match_and_the_difference_is_named(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"a": 1, "b": 1, "cat": 1}, "test": {"a": 1, "b": 1, "dog": 1}})
    with pytest.raises(PPFlowerError) as exc:
        data.load_datasets(root)
    msg = _one_line(exc)
    assert "cat" in msg and "dog" in msg


# ------------------------------------------------------------------------------------ kind 4: stale cache


@pytest.mark.parametrize("how", ["rewritten", "rewritten, old mtime restored (cp -p, rsync -a)"])
@pytest.mark.parametrize("memory", [False, True])
def test_kind4_an_image_rewritten_in_place_is_decoded_again(tmp_path, how, memory):
    root = _tree(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    target = root / "train" / "a" / "0.png"
    first, _ = data.load_datasets(root)
    assert list((tmp_path / "cache").glob("*.pt"))  # the disk cache was written
    before = os.stat(target)
    new = _save(target, 12345)  # same name, same size in pixels and (PNG of noise) about the same in bytes
    if "restored" in how:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    if not memory:
        data._MEMORY_CACHE.clear()  # a new process: only the disk cache
    again, _ = data.load_datasets(root)
    assert np.array_equal(again.images[0].permute(1, 2, 0).numpy(), new)
    assert not torch.equal(again.images[0], first.images[0])


def test_kind4_readme_says_where_the_cache_lives_and_how_to_clear_it():
    text = (ROOT / "README.md").read_text()
    assert "PPFLOWER_CACHE_DIR" in text and "~/.cache/pp_flower" in text and "rm -rf" in text


# ---------------------------------------------------------------------------- kind 5: protect loses files


@pytest.fixture
def tiny_transform(tmp_path) -> Path:
    from pp_flower.checkpoints import save_atomic, transform_blob
    from pp_flower.models import UNet

    torch.manual_seed(0)
    path = tmp_path / "h" / "h.pt"
    save_atomic(transform_blob(UNet(base=4, depth=2)), path)
    return path


def test_kind5_colliding_output_names_are_refused_before_writing(tmp_path, tiny_transform):
    """img.jpg and img.png made one output while "2 protected images" was printed."""
    from pp_flower.evaluation import protect_folder

    plain = tmp_path / "plain"
    _save(plain / "img.png", 1)
    _save(plain / "img.jpg", 2, fmt="JPEG")
    _save(plain / "other.png", 3)
    with pytest.raises(PPFlowerError) as exc:
        protect_folder(tiny_transform, plain, tmp_path / "out")
    msg = _one_line(exc)
    assert "img.jpg" in msg and "img.png" in msg and "Nothing was written" in msg
    assert not (tmp_path / "out").exists()
    # names that differ only in case collide on macOS' and Windows' file systems
    (plain / "img.jpg").rename(plain / "IMG.jpg")
    with pytest.raises(PPFlowerError, match="IMG.jpg"):
        protect_folder(tiny_transform, plain, tmp_path / "out")
    (plain / "IMG.jpg").rename(plain / "img2.jpg")
    assert protect_folder(tiny_transform, plain, tmp_path / "out") == 3 == len(list((tmp_path / "out").iterdir()))


@pytest.mark.parametrize("variant", ["same path", "relative path", "trailing ./", "symlink to it"])
def test_kind5_protect_never_overwrites_its_inputs(tmp_path, tiny_transform, variant, monkeypatch):
    """`ppflower protect --transform h.pt IN IN` replaced the plain originals: the user's data was gone."""
    from pp_flower.evaluation import protect_folder

    plain = tmp_path / "plain"
    for i in range(2):
        _save(plain / f"img{i}.png", i)
    before = {f.name: f.read_bytes() for f in plain.iterdir()}
    monkeypatch.chdir(tmp_path)
    out = {"same path": plain, "relative path": Path("plain/../plain"), "trailing ./": Path("./plain/."),
           "symlink to it": tmp_path / "link"}[variant]
    if variant == "symlink to it":
        out.symlink_to(plain, target_is_directory=True)
    with pytest.raises(PPFlowerError) as exc:
        protect_folder(tiny_transform, Path("plain"), out)
    assert "input" in _one_line(exc)
    assert {f.name: f.read_bytes() for f in plain.iterdir()} == before


def test_kind5_cli_prints_the_count_written_and_refuses_in_one_line(tmp_path, tiny_transform):
    plain = tmp_path / "plain"
    for i in range(3):
        _save(plain / f"img{i}.png", i)
    (plain / ".DS_Store").write_bytes(b"\0")
    (plain / "notes.txt").write_text("not an image")
    proc = _cli("protect", "--transform", tiny_transform, plain, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "3 protected images" in proc.stdout and len(list((tmp_path / "out").iterdir())) == 3
    proc = _cli("protect", "--transform", tiny_transform, plain, plain)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_kind5_train_classifier_out_never_overwrites_its_transform(tmp_path, tiny_transform):
    """`train-classifier --baseline gan --transform D/best.pt --out D` would replace the generator with ψ."""
    d = tmp_path / "user-0"
    d.mkdir()
    best = d / "best.pt"
    best.write_bytes(tiny_transform.read_bytes())
    before = best.read_bytes()
    proc = _cli("train-classifier", "--baseline", "gan", "--transform", best, "--out", d, "--epochs", 1,
                "--limit-train", 64, "--limit-eval", 16, "--batch-size", 32)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--out" in proc.stderr and "--transform" in proc.stderr and "Traceback" not in proc.stderr
    assert best.read_bytes() == before and not (d / "last.pt").exists()
