"""Dataset loaders, splits, the scoring subset and on-device augmentation (fastmask/data.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmask import FastmaskError, data

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def image_keys(x: torch.Tensor) -> set:
    return {bytes(img.numpy().tobytes()) for img in x}


# ---- loaders ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,classes", [("cifar10_subset.npz", 10), ("cifar100_subset.npz", 100)])
def test_shared_npz_subset(name, classes):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ds = data.load_dataset(f"npz:{path}", val_size=1000, seed=0)
    raw = np.load(path)
    assert (ds.num_classes, ds.image_size, ds.in_channels) == (classes, 32, 3)
    assert len(ds.classes) == classes and ds.classes[0] == str(raw["classes"][0])
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape[1:] == (3, 32, 32)
    assert len(ds.val_y) == 1000 and len(ds.train_y) + len(ds.val_y) == len(raw["y_train"])
    # test split is the file's test split, pixels unchanged (NHWC -> NCHW)
    assert torch.equal(ds.test_x, torch.from_numpy(raw["x_test"]).permute(0, 3, 1, 2))
    assert torch.equal(ds.test_y, torch.from_numpy(raw["y_test"]).long())
    # statistics come from the training images, close to the usual CIFAR constants
    assert all(0.35 < m < 0.6 for m in ds.mean) and all(0.2 < s < 0.35 for s in ds.std)


def write_npz(path, n_train=40, n_test=12, size=8, channels=3, classes=True, **overrides):
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels else (size, size)
    arrays = {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
              "y_train": rng.integers(0, 4, n_train).astype(np.int64),
              "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
              "y_test": rng.integers(0, 4, n_test).astype(np.int64)}
    if classes:
        arrays["classes"] = np.array(["ant", "bee", "cat", "dog"])
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("channels", [3, 0])  # 0: grayscale stored as N x H x W
def test_synthetic_npz(tmp_path, channels):
    arrays = write_npz(tmp_path / "toy.npz", channels=channels)
    ds = data.load_dataset(str(tmp_path / "toy.npz"), val_size=0.25, seed=3)
    assert ds.in_channels == (channels or 1) and ds.image_size == 8
    assert ds.classes == ["ant", "bee", "cat", "dog"] and ds.num_classes == 4
    assert len(ds.val_y) == 10 and len(ds.train_y) == 30
    pixels = torch.from_numpy(arrays["x_train"])
    pixels = pixels.permute(0, 3, 1, 2) if channels else pixels.unsqueeze(1)
    assert image_keys(ds.train_x) | image_keys(ds.val_x) == image_keys(pixels)
    assert not image_keys(ds.train_x) & image_keys(ds.val_x)


def test_npz_without_classes_names_them_by_label(tmp_path):
    write_npz(tmp_path / "toy.npz", classes=False)
    ds = data.load_dataset(f"npz:{tmp_path / 'toy.npz'}")
    assert ds.classes == [str(i) for i in range(ds.num_classes)]


@pytest.mark.parametrize("overrides,message", [
    ({"y_test": None}, "lacks keys y_test"),
    ({"x_train": None, "y_train": None}, "lacks keys x_train, y_train"),
    ({"x_train": np.zeros((40, 8, 8, 3), dtype=np.float32)}, "must be uint8"),
    ({"y_train": np.full(40, 7, dtype=np.int64)}, "labels outside"),
    ({"x_test": np.zeros((12, 6, 6, 3), dtype=np.uint8)}, "same image shape"),
])
def test_npz_bad_files(tmp_path, overrides, message):
    write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(FastmaskError, match=message):
        data.load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_missing_file(tmp_path):
    with pytest.raises(FastmaskError, match="does not exist"):
        data.load_dataset(str(tmp_path / "nothing.npz"))


COLORS = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}


def make_tinyimagenet(root: Path, per_class=4, val_per_class=2, size=8):
    from PIL import Image

    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    # wnids.txt is not sorted on purpose: labels follow the sorted wnids, as ImageFolder's do
    (folder / "wnids.txt").write_text("n03\nn01\nn02\n")
    (folder / "words.txt").write_text("n01\tred thing, crimson\nn02\tgreen thing\nn03\tblue thing\nn99\tunused\n")
    for wnid, color in COLORS.items():
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), color).save(images / f"{wnid}_{i}.JPEG", quality=100)
    lines = []
    for _ in range(val_per_class):
        for wnid in ("n02", "n03", "n01"):  # val images interleave classes, as the real folder does
            name = f"val_{len(lines)}.JPEG"
            Image.new("RGB", (size, size), COLORS[wnid]).save(folder / "val" / "images" / name, quality=100)
            lines.append(f"{name}\t{wnid}\t0\t0\t{size}\t{size}")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_synthetic_tinyimagenet(tmp_path, point_at):
    folder = make_tinyimagenet(tmp_path)
    ds = data.load_dataset("tinyimagenet", data_dir=str(tmp_path if point_at == "parent" else folder),
                           val_size=3, seed=0)
    assert ds.classes == ["red thing", "green thing", "blue thing"]
    assert (ds.num_classes, ds.image_size, ds.in_channels) == (3, 8, 3)
    assert len(ds.train_y) + len(ds.val_y) == 12 and len(ds.val_y) == 3
    assert len(ds.test_y) == 6
    # every image's dominant channel names its class: the val folder was sorted by val_annotations.txt
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        dominant = x.float().mean(dim=(2, 3)).argmax(dim=1)
        assert torch.equal(dominant, y)


def test_tinyimagenet_decode_cache_is_reused_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    from PIL import Image

    folder = make_tinyimagenet(tmp_path)
    first = data.load_dataset("tinyimagenet", data_dir=str(folder), val_size=3, seed=0)
    cached = sorted(p.name for p in data.decode_cache_dir().iterdir())
    assert len(cached) == 2 and all(p.endswith(".npy") for p in cached)  # train and test

    decoded = []
    real_decode = data._decode_images
    monkeypatch.setattr(data, "_decode_images", lambda paths: decoded.append(len(paths)) or real_decode(paths))
    again = data.load_dataset("tinyimagenet", data_dir=str(folder), val_size=3, seed=0)
    assert decoded == []  # both splits came from the cache
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, f"{split}_x"), getattr(again, f"{split}_x"))

    # a re-extracted image (new content, new mtime) must be decoded again, and the stale cache file replaced
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "train" / "n01" / "images" / "n01_0.JPEG", quality=100)
    changed = data.load_dataset("tinyimagenet", data_dir=str(folder), val_size=0, seed=0)
    assert decoded == [12]  # train only: the test split's files did not change
    blue = changed.train_x.float().mean(dim=(2, 3)).argmax(dim=1) == 2
    assert int(blue.sum()) == 5  # n03's four, plus the re-extracted n01 image: its new pixels, not the cached red
    assert sorted(p.name for p in data.decode_cache_dir().iterdir()) != cached
    assert len(list(data.decode_cache_dir().iterdir())) == 2


def test_decode_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_CACHE_DIR", "none")
    assert data.decode_cache_dir() is None
    folder = make_tinyimagenet(tmp_path)
    ds = data.load_dataset("tinyimagenet", data_dir=str(folder), val_size=3, seed=0)
    assert len(ds.test_y) == 6


def test_tinyimagenet_missing_folder(tmp_path):
    with pytest.raises(FastmaskError, match="tiny-imagenet-200") as info:
        data.load_dataset("tinyimagenet", data_dir=str(tmp_path))
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_digits(digits):
    assert (digits.num_classes, digits.image_size, digits.in_channels) == (10, 16, 1)
    assert len(digits.train_y) + len(digits.val_y) + len(digits.test_y) == 1797
    assert digits.train_x.dtype == torch.uint8 and int(digits.train_x.max()) == 255
    assert digits.classes == [str(i) for i in range(10)]
    assert set(digits.train_y.tolist()) == set(range(10))
    other_seed = data.load_dataset("digits", seed=1)
    assert torch.equal(other_seed.test_x, digits.test_x)  # the test split never moves with the seed
    assert not torch.equal(other_seed.val_y, digits.val_y) or not torch.equal(other_seed.val_x, digits.val_x)


def test_cifar_absent_gives_one_line_error(tmp_path):
    with pytest.raises(FastmaskError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "cifar-10-batches-py" in message


def test_unknown_dataset():
    with pytest.raises(FastmaskError, match="unknown dataset 'mnist'"):
        data.load_dataset("mnist")


# ---- splits -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,val_size,expected", [(100, 0.2, 20), (100, 7, 7), (50, 0, 0)])
def test_split_deterministic_and_disjoint(n, val_size, expected):
    train, val = data.split_indices(n, val_size, seed=5)
    again_train, again_val = data.split_indices(n, val_size, seed=5)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(val) == expected
    assert sorted(train.tolist() + val.tolist()) == list(range(n))
    if expected:
        _, other_val = data.split_indices(n, val_size, seed=6)
        assert not torch.equal(val, other_val)


@pytest.mark.parametrize("val_size", [100, 1.5, -1])
def test_split_rejects_bad_sizes(val_size):
    with pytest.raises(FastmaskError):
        data.split_indices(100, val_size, seed=0)


def test_dataset_val_is_carved_from_train(digits):
    whole = data.load_dataset("digits", val_size=0)
    assert len(whole.val_y) == 0

    def keys(x, y):
        return sorted(bytes(img.numpy().tobytes()) + bytes([int(label)]) for img, label in zip(x, y))

    assert keys(torch.cat([digits.train_x, digits.val_x]), torch.cat([digits.train_y, digits.val_y])) == keys(
        whole.train_x, whole.train_y)
    again = data.load_dataset("digits")
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.train_y, digits.train_y)


# ---- normalization, batches, augmentation -----------------------------------------------------------------------
def test_normalize(digits):
    x = digits.train_x[:5]
    expected = (x.float() / 255 - digits.mean[0]) / digits.std[0]
    torch.testing.assert_close(data.normalize(x, digits, "cpu"), expected)


def test_plain_batches_are_normalized_in_order(digits):
    x, y = digits.train_x[:70], digits.train_y[:70]
    batches = list(data.iterate_batches(x, y, digits, 32, "cpu", shuffle=False, augment=False))
    assert [len(b[1]) for b in batches] == [32, 32, 6]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), data.normalize(x, digits, "cpu"))
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def epoch(x, y, dataset, seed):
    generator = torch.Generator().manual_seed(seed)
    return list(data.iterate_batches(x, y, dataset, 16, "cpu", shuffle=True, augment=True, generator=generator))


def test_augmentation_deterministic_given_generator(digits):
    x, y = digits.train_x[:40], digits.train_y[:40]
    first, second, other = epoch(x, y, digits, 0), epoch(x, y, digits, 0), epoch(x, y, digits, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("channels,size", [(1, 16), (3, 8), (3, 32)])
def test_augment_is_a_padded_crop_or_its_mirror(channels, size):
    """Implementation-independent check: every output is one of the (2p+1)^2 crops of the zero-padded image,
    flipped or not, and every output keeps plain NCHW strides."""
    torch.manual_seed(0)
    x = torch.rand(6, channels, size, size)
    out = data.augment_batch(x, torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.stride() == torch.empty(x.shape).stride()
    pad = data.crop_padding(size)
    padded = F.pad(x, (pad, pad, pad, pad))
    for b in range(len(x)):
        crops = [padded[b, :, i:i + size, j:j + size] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
        plain = any(torch.equal(out[b], c) for c in crops)
        mirrored = any(torch.equal(out[b], c.flip(2)) for c in crops)
        assert plain or mirrored
    assert data.crop_padding(32) == 4


def test_augmentation_flips_and_shifts(digits):
    x = digits.train_x[:256].float() / 255
    out = data.augment_batch(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1).float().mean()
    assert 0.5 < changed <= 1.0  # most images move (the identity crop without flip has probability 1/50)


# ---- scoring subset ---------------------------------------------------------------------------------------------
def test_scoring_subset_fixed_and_not_augmented(digits):
    images, labels = data.scoring_subset(digits, 50, "cpu", seed=0)
    again, again_labels = data.scoring_subset(digits, 50, "cpu", seed=0)
    assert images.shape == (50, 1, 16, 16) and torch.equal(images, again) and torch.equal(labels, again_labels)
    whole, whole_labels = data.scoring_subset(digits, 0, "cpu")
    torch.testing.assert_close(whole, data.normalize(digits.train_x, digits, "cpu"))
    assert torch.equal(whole_labels, digits.train_y)
    # each subset image is an unaugmented train image with its label
    flat = whole.flatten(1)
    for image, label in zip(images, labels):
        match = (flat == image.flatten()).all(1).nonzero().flatten()
        assert len(match) >= 1 and label in whole_labels[match]
    bigger, _ = data.scoring_subset(digits, 10 ** 9, "cpu")
    assert bigger.shape[0] == len(digits.train_y)
    other, _ = data.scoring_subset(digits, 50, "cpu", seed=1)
    assert not torch.equal(other, images)
    with pytest.raises(FastmaskError):
        data.scoring_subset(digits, -1, "cpu")


@pytest.mark.cuda
def test_batches_on_cuda_match_cpu(digits):
    x, y = digits.train_x[:40], digits.train_y[:40]
    on_cpu = list(data.iterate_batches(x, y, digits, 16, "cpu", shuffle=True, augment=True,
                                       generator=torch.Generator().manual_seed(0)))
    on_gpu = list(data.iterate_batches(x, y, digits, 16, "cuda", shuffle=True, augment=True,
                                       generator=torch.Generator().manual_seed(0)))
    for (cpu_x, cpu_y), (gpu_x, gpu_y) in zip(on_cpu, on_gpu):
        assert gpu_x.is_cuda and torch.equal(gpu_y.cpu(), cpu_y)
        torch.testing.assert_close(gpu_x.cpu(), cpu_x)


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (4100, 1, 2, 3)])  # the second crosses a 4096-image chunk
def test_channel_stats_equal_a_float64_computation(shape):
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pixels = x.to(torch.float64).transpose(0, 1).reshape(shape[1], -1) / 255
    mean, std = data.channel_stats(x)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), pixels.mean(dim=1))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), pixels.std(dim=1, unbiased=False))
