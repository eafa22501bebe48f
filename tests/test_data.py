import subprocess
import sys

import pytest
import torch

from pp_flower.data import augment, load_datasets, stratified_split, user_shards
from pp_flower.errors import PPFlowerError


def test_paper_split_sizes_and_stratification(splits):
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45_000, 5_000, 10_000)
    assert torch.bincount(splits.val.labels).tolist() == [500] * 10
    assert torch.bincount(splits.train.labels).tolist() == [4_500] * 10
    assert len(set(splits.train_ids.tolist()) & set(splits.val_ids.tolist())) == 0
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 32, 32)
    assert splits.train_all.classes[0] == "airplane"


def test_split_is_seeded():
    labels = torch.arange(1000) % 10
    a, b = stratified_split(labels, 0.1, seed=3), stratified_split(labels, 0.1, seed=3)
    c = stratified_split(labels, 0.1, seed=4)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_limit_train_is_a_mixed_subset(data_dir):
    from pp_flower.data import load_splits

    s = load_splits(data_dir, limit_train=2048)
    assert len(s.train) == 2048
    assert torch.bincount(s.train.labels, minlength=10).min() > 100  # not the first class only


def test_user_shards():
    shards = user_shards(100, 3, "iid", seed=0)
    assert sorted(torch.cat(shards).tolist()) == list(range(100))
    assert [len(s) for s in shards] == [34, 33, 33]
    assert all(len(s) == 10 for s in user_shards(10, 2, "full"))
    with pytest.raises(PPFlowerError):
        user_shards(10, 2, "bogus")


def test_augment_crops_and_flips_per_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    outs = {tuple(augment(x, torch.Generator().manual_seed(s), pad=2)[0].flatten().tolist()) for s in range(20)}
    assert len(outs) > 5  # different crops/flips for different draws
    y = augment(x, torch.Generator().manual_seed(0), pad=2, crop=False)
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1)) for i in range(2))


def test_second_load_is_cached(data_dir, monkeypatch):
    """A second load (fresh process memory) comes from the disk cache: not one JPEG is decoded."""
    import pp_flower.data as d

    first = load_datasets(data_dir)
    d._MEMORY_CACHE.clear()

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the disk cache holds the data set")

    monkeypatch.setattr(d, "read_image", no_decoding)
    train, test = load_datasets(data_dir)
    assert len(train) == 50_000 and len(test) == 10_000
    assert torch.equal(train.images[:64], first[0].images[:64]) and torch.equal(test.labels, first[1].labels)


def test_missing_and_malformed_data_dirs(tmp_path):
    with pytest.raises(PPFlowerError, match="does not exist.*PPFLOWER_DATA_DIR"):
        load_datasets(tmp_path / "missing")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(PPFlowerError, match="no 'test/' folder"):
        load_datasets(tmp_path)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(PPFlowerError, match="No images found"):
        load_datasets(tmp_path)


def test_cli_reports_missing_data_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cli.ppflower", "train-classifier", "--epochs", "1",
                           "--data-dir", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "PPFLOWER_DATA_DIR" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
