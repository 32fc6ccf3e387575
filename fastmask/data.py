"""Datasets held in memory as uint8 tensors; batches are normalized and augmented on the device.

Every loader returns a Dataset with train / val / test splits as uint8 [N, C, H, W] CPU tensors and int64 labels.
The val split is carved from the train split by a seed, so model selection never looks at the test set.

Names understood by load_dataset:
- "cifar10", "cifar100": torchvision's CIFAR files in data_dir (downloaded there when possible).
- "tinyimagenet": the standard tiny-imagenet-200 folder (its val folder, labelled, is our test split). Decoded
  images are cached as .npy in decode_cache_dir(), keyed by every file's path, size and mtime.
- "npz:<path>" or any path ending in .npz: x_train, y_train, x_test, y_test (uint8 NHWC or NHW), optional classes.
- "folder:<path>": an ImageFolder layout. <path>/train/<class>/* with val/ and/or test/ beside it (val/ alone is the
  test split, as TinyImageNet's labelled val; validation images are then carved from train/), or <path>/<class>/*
  (a fixed FOLDER_TEST_FRACTION of each class becomes the test split). Images are resized (shorter side) and
  center-cropped to `image_size`, decoded once and cached like TinyImageNet's. Normalization is computed from the
  train split unless `mean` and `std` are given. Before decoding, the memory the images need is estimated and a
  folder that will not fit is refused.
- "digits": the offline default, scikit-learn's 1,797 real 8x8 grayscale digits upsampled to 16x16.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FastmaskError
from .files import atomic_write

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NPZ_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_SIZE = 16
DIGITS_TEST_SIZE = 360
# The digits test split is a property of the dataset, not of the run: it never moves with `seed`.
DIGITS_TEST_SEED = 20240601
CROP_PADDING_AT_32 = 4


@dataclass
class Dataset:
    name: str
    num_classes: int
    image_size: int
    in_channels: int
    mean: tuple
    std: tuple
    classes: list
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def __repr__(self) -> str:  # the default would print every pixel
        return (f"Dataset({self.name!r}, classes={self.num_classes}, image={self.in_channels}x{self.image_size}x"
                f"{self.image_size}, train={len(self.train_y)}, val={len(self.val_y)}, test={len(self.test_y)})")


# ---- loading ----------------------------------------------------------------------------------------------------
def load_dataset(name: str, data_dir: Optional[str] = None, val_size: int | float = 0.1, seed: int = 0,
                 download: bool = True, image_size: Optional[int] = None, mean: Optional[list] = None,
                 std: Optional[list] = None) -> Dataset:
    """Loads a dataset by name (see the module docstring) and carves `val_size` images (a count, or a fraction
    below 1) out of its train split, chosen by `seed` (a folder's own val/ split, when it has one, is used instead).
    image_size, mean and std apply to folder datasets."""
    key = name.strip()
    given_val = None
    if (image_size is not None or mean is not None or std is not None) and not key.lower().startswith("folder:"):
        raise FastmaskError("--image-size, --mean and --std apply to folder:<path> datasets; the other datasets "
                            "have their own size and statistics")
    if key.lower().startswith("folder:"):
        parts, given_val = _load_folder(Path(key[len("folder:"):]).expanduser(), image_size or FOLDER_IMAGE_SIZE)
        if mean is not None or std is not None:
            if mean is None or std is None:
                raise FastmaskError("give both --mean and --std, or neither (then both come from the train split)")
            channels = int(parts[0].shape[1])
            stats = tuple(tuple(v) * (channels if len(v) == 1 else 1) for v in (mean, std))
            parts = (*parts[:5], stats, parts[6])
    elif key.lower() in CIFAR_STATS:
        parts = _load_cifar(key.lower(), data_dir, download)
    elif key.lower() in ("tinyimagenet", "tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200"):
        parts = _load_tinyimagenet(data_dir)
    elif key.lower().startswith("npz:") or key.lower().endswith(".npz"):
        path = key[4:] if key.lower().startswith("npz:") else key
        parts = _load_npz(Path(path).expanduser())
    elif key.lower() == "digits":
        parts = _load_digits()
    else:
        raise FastmaskError(f"unknown dataset {name!r}; use cifar10, cifar100, tinyimagenet, digits, "
                            "npz:<path to a .npz file> or folder:<path to an image folder>")
    train_x, train_y, test_x, test_y, classes, stats, dataset_name = parts
    folder = key.lower().startswith("folder:")
    # A folder's statistics are its train split's, without the val images; the other datasets keep theirs (taken
    # before the val split), so their runs stay as they were.
    mean, std = stats if stats is not None else (None, None) if folder else channel_stats(train_x)
    if given_val is not None:
        val_x, val_y = given_val
    else:
        train_idx, val_idx = split_indices(len(train_y), val_size, seed)
        train_x, train_y, val_x, val_y = train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx]
    if stats is None and folder:
        mean, std = channel_stats(train_x)
    return Dataset(name=dataset_name, num_classes=len(classes), image_size=int(train_x.shape[-1]),
                   in_channels=int(train_x.shape[1]), mean=tuple(float(m) for m in mean),
                   std=tuple(float(s) for s in std), classes=list(classes),
                   train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y)


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), disjoint, each ascending; which images go to val depends only on n and seed."""
    if isinstance(val_size, float) and 0 < val_size < 1:
        count = int(round(n * val_size))
    elif float(val_size) == int(val_size) and val_size >= 0:
        count = int(val_size)
    else:
        raise FastmaskError(f"val_size must be a count >= 0 or a fraction in (0, 1), got {val_size!r}")
    if count >= n:
        raise FastmaskError(f"val_size {val_size!r} takes all {n} training images; use a smaller val_size")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    return order[count:].sort().values, order[:count].sort().values


def channel_stats(x: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images in [0, 1] units, from per-channel histograms of the 256 byte values:
    exact, and an order of magnitude faster than summing float64 copies of the pixels (seconds on TinyImageNet)."""
    channels = x.shape[1]
    histogram = torch.zeros(channels, 256, dtype=torch.int64)
    for start in range(0, x.shape[0], 4096):  # chunks bound the per-channel copies that bincount needs
        chunk = x[start:start + 4096]
        for c in range(channels):
            histogram[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = histogram.sum(dim=1).to(torch.float64)
    mean = (histogram * values).sum(dim=1) / count
    std = ((histogram * values * values).sum(dim=1) / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _nhwc_to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def _load_cifar(name: str, data_dir: Optional[str], download: bool):
    import torchvision

    root = Path(data_dir or "data").expanduser()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=download)
    except Exception as err:
        reason = " ".join(str(err).split())
        raise FastmaskError(f"{name} is not in {root} and could not be downloaded ({reason}); put the extracted "
                            f"{folder}/ folder (from {archive}) in {root} or pass --data-dir") from err
    classes = list(train.classes)
    return (_nhwc_to_tensor(train.data), torch.as_tensor(train.targets, dtype=torch.int64),
            _nhwc_to_tensor(test.data), torch.as_tensor(test.targets, dtype=torch.int64),
            classes, CIFAR_STATS[name], name)


def _images_to_tensor(images: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if images.dtype != np.uint8:
        raise FastmaskError(f"{path}: {key} must be uint8 pixels (0-255), got {images.dtype}")
    if images.ndim == 3:  # grayscale NHW
        images = images[..., None]
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] not in (1, 3):
        raise FastmaskError(f"{path}: {key} must be N x H x W x C with square images and 1 or 3 channels, "
                            f"got shape {images.shape}")
    return _nhwc_to_tensor(images)


def _labels_to_tensor(labels: np.ndarray, key: str, count: int, path: Path) -> torch.Tensor:
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise FastmaskError(f"{path}: {key} must be {count} integer labels, got dtype {labels.dtype} shape "
                            f"{labels.shape}")
    return torch.from_numpy(labels.astype(np.int64))


def _load_npz(path: Path):
    if not path.is_file():
        raise FastmaskError(f"npz dataset {path} does not exist; pass the path of a .npz file with keys "
                            f"{', '.join(NPZ_REQUIRED_KEYS)}")
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as err:
        raise FastmaskError(f"{path} is not a readable .npz file ({' '.join(str(err).split())})") from err
    missing = [k for k in NPZ_REQUIRED_KEYS if k not in keys]
    if missing:
        raise FastmaskError(f"{path} lacks keys {', '.join(missing)}; an npz dataset needs "
                            f"{', '.join(NPZ_REQUIRED_KEYS)} (and optionally classes)")
    train_x = _images_to_tensor(archive["x_train"], "x_train", path)
    test_x = _images_to_tensor(archive["x_test"], "x_test", path)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise FastmaskError(f"{path}: x_train images are {tuple(train_x.shape[1:])} but x_test images are "
                            f"{tuple(test_x.shape[1:])}; both splits must have the same image shape")
    train_y = _labels_to_tensor(archive["y_train"], "y_train", len(train_x), path)
    test_y = _labels_to_tensor(archive["y_test"], "y_test", len(test_x), path)
    if "classes" in keys:
        classes = [str(c) for c in archive["classes"].tolist()]
    else:
        classes = [str(i) for i in range(int(max(train_y.max(), test_y.max())) + 1)]
    for key, labels in (("y_train", train_y), ("y_test", test_y)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
            raise FastmaskError(f"{path}: {key} holds labels outside [0, {len(classes)}) of its "
                                f"{len(classes)} classes")
    if len(classes) < 2:
        raise FastmaskError(f"{path}: a dataset needs at least 2 classes, found {len(classes)}")
    return train_x, train_y, test_x, test_y, classes, None, path.stem


# ---- image folders ----------------------------------------------------------------------------------------------
FOLDER_IMAGE_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# A one-folder dataset's test split: this fraction of each class, drawn by a seed that is the dataset's, not the run's.
FOLDER_TEST_FRACTION = 0.2
FOLDER_TEST_SEED = 20240601
# Bytes held per decoded byte at the peak of loading: the decoded array, its NCHW copy and the split copies.
FOLDER_MEMORY_FACTOR = 3


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def folder_memory_estimate(images: int, image_size: int, channels: int = 3) -> int:
    """Bytes loading `images` images at image_size needs at its peak."""
    return FOLDER_MEMORY_FACTOR * images * channels * image_size * image_size


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """{class name: its image files, sorted}, for every class folder of `folder` (files found recursively)."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        classes[sub.name] = files
    return classes


def _labelled(files: dict[str, list[Path]], label_of: dict[str, int], folder: Path) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for name, items in files.items():
        if name not in label_of:
            raise FastmaskError(f"image folder {folder} has class {name!r}, which train/ does not have")
        paths += items
        labels += [label_of[name]] * len(items)
    return paths, labels


def _load_folder(root: Path, image_size: int):
    """(the parts load_dataset takes, the given val split or None) for an image folder (see the module docstring)."""
    if not root.is_dir():
        raise FastmaskError(f"image folder {root} does not exist; pass folder:<path> of a folder holding train/ (and "
                            "val/ or test/) with a folder per class, or just a folder per class")
    splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    layout = "split" if "train" in splits else "single"
    train_files = _class_files(splits.get("train", root))
    counted = {name: files for name, files in train_files.items() if files}
    if not counted:
        raise FastmaskError(f"image folder {splits.get('train', root)} has no images: put them in one folder per class "
                            f"({', '.join(IMAGE_SUFFIXES[:5])}, ...)")
    if len(counted) < 2:
        raise FastmaskError(f"image folder {splits.get('train', root)} has one class ({next(iter(counted))}); a "
                            "classifier needs at least 2 class folders")
    classes = list(train_files)
    label_of = {name: i for i, name in enumerate(classes)}
    train_paths, train_labels = _labelled(train_files, label_of, splits.get("train", root))
    others = {}
    for name in ("val", "test"):
        if name in splits:
            others[name] = _labelled(_class_files(splits[name]), label_of, splits[name])
            if not others[name][0]:
                raise FastmaskError(f"image folder {splits[name]} has no images in its class folders")
    total = len(train_paths) + sum(len(p) for p, _ in others.values())
    estimate, available = folder_memory_estimate(total, image_size), available_memory()
    if available is not None and estimate > available:
        raise FastmaskError(f"image folder {root}: {total:,} images at {image_size}x{image_size} need about "
                            f"{estimate / 2 ** 30:.1f} GiB of memory, more than the {available / 2 ** 30:.1f} GiB "
                            "available; lower --image-size or use fewer images")
    key = "folder-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] + f"-{image_size}"

    def read(paths: list[Path], split: str) -> torch.Tensor:
        return _nhwc_to_tensor(_read_images(paths, f"{key}-{split}", lambda p: _decode_fitted(p, image_size)))

    train_x, train_y = read(train_paths, "train"), torch.tensor(train_labels, dtype=torch.int64)
    given_val = None
    if layout == "single":
        test_idx = _per_class_fraction(train_y, FOLDER_TEST_FRACTION, FOLDER_TEST_SEED)
        keep = torch.ones(len(train_y), dtype=torch.bool)
        keep[test_idx] = False
        test_x, test_y = train_x[test_idx], train_y[test_idx]
        train_x, train_y = train_x[keep], train_y[keep]
    else:
        if "val" in others and "test" in others:
            given_val = (read(others["val"][0], "val"), torch.tensor(others["val"][1], dtype=torch.int64))
        test_paths, test_labels = others.get("test") or others.get("val") or (None, None)
        if test_paths is None:
            raise FastmaskError(f"image folder {root} has train/ but neither val/ nor test/ beside it; add one, or "
                                "point folder: at train/ alone to split it")
        test_x = read(test_paths, "test" if "test" in others else "val")
        test_y = torch.tensor(test_labels, dtype=torch.int64)
    return (train_x, train_y, test_x, test_y, classes, None, root.name), given_val


def _per_class_fraction(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of round(fraction * n_c) images of each class c (at least one, and never all), drawn by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < 2:
            continue
        count = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.int64)


def _decode_fitted(path: Path, size: int) -> np.ndarray:
    """One image as uint8 size x size x 3: its shorter side resized to `size`, then center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            resized = (max(size, round(width * scale)), max(size, round(height * scale)))
            image = image.resize(resized, Image.BILINEAR)
            left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except Exception as err:
        raise FastmaskError(f"cannot read image {path} ({type(err).__name__}: {' '.join(str(err).split())}); remove "
                            "or replace it") from None


def _tinyimagenet_root(data_dir: Optional[str]) -> Path:
    base = Path(data_dir or "data").expanduser()
    for candidate in (base / "tiny-imagenet-200", base):
        if (candidate / "wnids.txt").is_file() and (candidate / "train").is_dir():
            return candidate
    raise FastmaskError(f"TinyImageNet not found in {base}: put the extracted tiny-imagenet-200/ folder "
                        "(wnids.txt, train/<wnid>/images/*.JPEG, val/images/, val/val_annotations.txt) there "
                        "or pass --data-dir")


def _read_images(paths: list[Path], cache_key: str, decode=None) -> np.ndarray:
    """Decoded images, from the decode cache when the files are unchanged since they were cached (cache_key names the
    folder and split). TinyImageNet's 110k JPEGs take minutes to decode; the cached array loads in seconds."""
    cache = _decode_cache_path(paths, cache_key)
    if cache is not None and cache.is_file():
        try:
            return np.load(cache, allow_pickle=False)
        except (OSError, ValueError):  # a truncated or foreign file: decode again and overwrite it
            pass
    images = _decode_images(paths) if decode is None else _decode_each(paths, decode)
    if cache is not None:
        _write_decode_cache(cache, images)
    return images


def decode_cache_dir() -> Optional[Path]:
    """FASTMASK_CACHE_DIR, else $XDG_CACHE_HOME/fastmask or ~/.cache/fastmask; None when FASTMASK_CACHE_DIR=none."""
    configured = os.environ.get("FASTMASK_CACHE_DIR")
    if configured is not None:
        return None if configured.strip().lower() in ("", "none", "0", "off") else Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastmask"


def _decode_cache_path(paths: list[Path], cache_key: str) -> Optional[Path]:
    base = decode_cache_dir()
    if base is None:
        return None
    # The file name holds a digest of every file's path, size and mtime: any change to the folder is a new file.
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return base / f"{cache_key}-{digest.hexdigest()[:20]}.npy"


def _write_decode_cache(cache: Path, images: np.ndarray) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for stale in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.npy"):
            stale.unlink()  # an older decode of the same folder and split
        with atomic_write(cache) as partial, open(partial, "wb") as f:  # readers never see a half-written file
            np.save(f, images, allow_pickle=False)
    except OSError as error:
        warnings.warn(f"could not write the decode cache {cache} ({error}); set FASTMASK_CACHE_DIR to a writable "
                      "folder to load faster next time", stacklevel=3)


def _decode_images(paths: list[Path]) -> np.ndarray:
    """Decodes image files to one uint8 N x H x W x 3 array; every image is resized to the first one's size."""
    from PIL import Image

    with Image.open(paths[0]) as first:
        size = first.size

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != size:
                image = image.resize(size, Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)

    out = np.empty((len(paths), size[1], size[0], 3), dtype=np.uint8)
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        for i, pixels in enumerate(pool.map(decode, paths, chunksize=256)):
            out[i] = pixels
    return out


def _decode_each(paths: list[Path], decode) -> np.ndarray:
    """decode(path) -> H x W x C uint8 for every path, in threads, into one N x H x W x C array."""
    first = decode(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first
    with ThreadPoolExecutor() as pool:
        for i, pixels in enumerate(pool.map(decode, paths[1:], chunksize=64), start=1):
            out[i] = pixels
    return out


def _load_tinyimagenet(data_dir: Optional[str]):
    root = _tinyimagenet_root(data_dir)
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines() if line.strip())
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    classes = [words.get(w, w) for w in wnids]

    train_paths, train_labels = [], []
    for wnid in wnids:
        files = sorted((root / "train" / wnid / "images").glob("*.[jJpP][pPnN][eEgG]*"))
        if not files:
            raise FastmaskError(f"TinyImageNet folder {root} has no images in train/{wnid}/images; "
                                "re-extract tiny-imagenet-200")
        train_paths += files
        train_labels += [label_of[wnid]] * len(files)

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FastmaskError(f"TinyImageNet folder {root} lacks val/val_annotations.txt; re-extract "
                            "tiny-imagenet-200")
    test_paths, test_labels = [], []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in label_of:
            raise FastmaskError(f"{annotations} names class {fields[1]!r}, which is not in wnids.txt")
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(label_of[fields[1]])
    absent = [p for p in test_paths if not p.is_file()]
    if absent or not test_paths:
        raise FastmaskError(f"TinyImageNet folder {root}: val/images lacks {len(absent)} images listed in "
                            f"val_annotations.txt (e.g. {absent[0].name if absent else 'all'}); re-extract it")
    folder_key = "tinyimagenet-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    train_x = _nhwc_to_tensor(_read_images(train_paths, folder_key + "-train"))
    test_x = _nhwc_to_tensor(_read_images(test_paths, folder_key + "-test"))
    if test_x.shape[1:] != train_x.shape[1:]:
        test_x = F.interpolate(test_x.float(), size=train_x.shape[-2:], mode="bilinear",
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return (train_x, torch.tensor(train_labels, dtype=torch.int64), test_x,
            torch.tensor(test_labels, dtype=torch.int64), classes, None, "tinyimagenet")


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / 16.0)  # 0..16 gray levels -> 0..255
    pixels = F.interpolate(pixels, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rest, test = split_indices(len(labels), DIGITS_TEST_SIZE, DIGITS_TEST_SEED)
    classes = [str(int(c)) for c in digits.target_names]
    return images[rest], labels[rest], images[test], labels[test], classes, None, "digits"


# ---- batches on the device --------------------------------------------------------------------------------------
def _stats_on(dataset: Dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(dataset.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std


def normalize(x_uint8: torch.Tensor, dataset: Dataset, device) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 (x / 255 - mean) / std on `device`."""
    mean, std = _stats_on(dataset, device)
    x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
    return x.sub_(mean).div_(std)


def crop_padding(image_size: int) -> int:
    """The usual CIFAR crop padding (4 at 32x32), scaled to the image size."""
    return max(1, int(round(CROP_PADDING_AT_32 * image_size / 32)))


def augment_batch(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Random crop (zero padding, before normalization) + horizontal flip of a float [B, C, H, W] batch.

    The random numbers are drawn on the CPU from `generator`, so the result is the same on every device. Crop and
    flip are one gather over the padded image, which leaves the result in plain NCHW strides: a permuted result
    with C = 1 has strides that are also channels-last, and oneDNN's conv weight-gradient corrupts the heap on such
    inputs (seen with torch 2.14 on the CPU).
    """
    batch, channels, height, width = x.shape
    pad = crop_padding(height)
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator).to(x.device)
    flips = torch.rand(batch, generator=generator).lt(0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    rows = offsets[0].view(batch, 1, 1) + torch.arange(height, device=x.device).view(1, height, 1)
    columns = torch.arange(width, device=x.device).view(1, 1, width)
    columns = torch.where(flips.view(batch, 1, 1), (width - 1) - columns, columns) + offsets[1].view(batch, 1, 1)
    source = (rows * padded_width + columns).view(batch, 1, height * width).expand(batch, channels, height * width)
    return padded.reshape(batch, channels, -1).gather(2, source).view(batch, channels, height, width)


def iterate_batches(x: torch.Tensor, y: torch.Tensor, dataset: Dataset, batch_size: int, device, *, shuffle: bool,
                    augment: bool, generator: Optional[torch.Generator] = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalized float images, int64 labels) on `device`, batch by batch. The uint8 split is copied to the device
    once, and shuffling and augmentation are deterministic given `generator` (a CPU generator)."""
    if batch_size <= 0:
        raise FastmaskError(f"batch size must be positive, got {batch_size}")
    n = len(y)
    x_device = x.to(device, non_blocking=True)
    y_device = y.to(device, non_blocking=True)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    mean, std = _stats_on(dataset, device)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        images = x_device[index].float().div_(255.0)
        if augment:
            images = augment_batch(images, generator)
        yield images.sub_(mean).div_(std), y_device[index]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def scoring_subset(dataset: Dataset, size: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, non-augmented subset of the TRAIN split (normalized, on `device`), the same images in the same order
    for a given (size, seed). size 0 or >= the split's size gives the whole train split."""
    n = len(dataset.train_y)
    if size < 0:
        raise FastmaskError(f"scoring subset size must be >= 0 (0 = the whole train split), got {size}")
    if size == 0 or size >= n:
        index = torch.arange(n)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(n, generator=generator)[:size].sort().values
    return normalize(dataset.train_x[index], dataset, device), dataset.train_y[index].to(device)
