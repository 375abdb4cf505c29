"""Image datasets as whole-split uint8 tensors, their splits, and batching on the device (no torchvision,
no DataLoader).

``load_dataset`` returns one split of a dataset as an ``ImageData`` (``dataset_files`` reads the official
formats). A recipe's dataset entry (``load_splits``) adds a validation split held out of the training
images, and what checkpoints and files record about the data (``dataset_record``) is checked before use
(``check_dataset_record``). ``Batches`` keeps a split on the device and serves slices of a seeded
permutation, normalised and augmented a whole batch at a time.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from .config import enum_value
from .dataset_files import read_split
from .errors import ConfigError, DataError

SPLITS = ("train", "test")


class DatasetName(str, Enum):
    """Built-in datasets: DIGITS ships with scikit-learn (offline default); the others read official files."""

    DIGITS = "digits"
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"


class Augment(str, Enum):
    """Training-time augmentation: NONE; CROP_FLIP (4-px zero-padded random crop + horizontal flip, the
    CIFAR standard); SHIFT (2-px zero-padded random crop only: digits are not mirror-symmetric)."""

    NONE = "none"
    CROP_FLIP = "crop_flip"
    SHIFT = "shift"


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class ImageData:
    """One split of an image dataset, whole, as CPU tensors."""

    images: torch.Tensor  # uint8 (N, C, H, W), C = 1 or 3
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, 0..1 scale
    std: tuple[float, ...]
    name: str  # e.g. "mnist"
    augment: str = Augment.NONE  # what Batches(augment=True) applies

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W) with C 1 or 3, "
                            f"got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise DataError(f"{self.name}: labels must be int64 ({images.shape[0]},), "
                            f"got {labels.dtype} {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels or min(self.std, default=1) <= 0:
            raise DataError(f"{self.name}: need {channels} mean and positive std values, "
                            f"got mean {self.mean} std {self.std}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels span {int(labels.min())}..{int(labels.max())}, "
                            f"expected 0..{len(self.classes) - 1} ({len(self.classes)} classes)")
        object.__setattr__(self, "augment", _augment_option(self.augment))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])

    def subset(self, n: int, seed: int = 0) -> "ImageData":
        """The first ``n`` samples (all, if fewer) of a permutation seeded by ``seed``; for tests and quick runs."""
        if n < 0:
            raise ConfigError(f"subset size must be >= 0, got {n}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return self._take(order)

    def hold_out(self, n: int, seed: int = 0) -> tuple["ImageData", "ImageData"]:
        """(rest, held_out): the last ``n`` samples of a permutation seeded by ``seed`` are held out.

        A fixed, disjoint carve-out (e.g. a validation split from the training split); both parts keep
        the original sample order. ``subset`` of the rest never reaches into the held-out part.

        Raises:
            ConfigError: ``n`` is negative or leaves no sample in the rest.
        """
        if not 0 <= n < len(self):
            raise ConfigError(f"{self.name}: cannot hold out {n} of {len(self)} samples (need 0 <= n < {len(self)})")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - n
        return self._take(order[:cut].sort().values), self._take(order[cut:].sort().values)

    def _take(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.images[index], self.labels[index], self.classes, self.mean, self.std, self.name,
                         self.augment)


def _augment_option(value) -> Augment:
    try:
        return Augment(value)
    except ValueError:
        raise ConfigError(f"unknown augmentation {value!r}; valid: {[a.value for a in Augment]}") from None

# ---------------------------------------------------------------------------------------------------
# Loading and splits


def load_dataset(
    name: str, root: str | os.PathLike | None = None, split: str = "train", *, download: bool = True
) -> ImageData:
    """Load one split of a dataset as uint8 tensors.

    Args:
        name: a ``DatasetName`` value: "digits", "mnist", "cifar10" or "imagefolder".
        root: folder holding the files (default ``./data``); ignored for digits. MNIST looks in
            ``root/MNIST/raw``, ``root/raw`` and ``root``; CIFAR-10 in ``root/cifar-10-batches-py`` and
            ``root``; an image folder is ``root/{train,test}/<class>/*.png|jpg|jpeg``.
        split: "train" or "test".
        download: fetch missing MNIST/CIFAR-10 files from the official URLs (MD5-checked).

    Raises:
        ConfigError: unknown dataset name or split.
        DataError: files missing (and not downloadable), truncated or not in the expected format.
    """
    try:
        dataset = DatasetName(name.lower() if isinstance(name, str) else name)
    except ValueError:
        raise ConfigError(f"unknown dataset {name!r}; valid: {[d.value for d in DatasetName]}") from None
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    root = Path("data") if root is None else Path(root).expanduser()
    decoded = read_split(dataset.value, root, split, download)
    return ImageData(torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels), decoded.classes,
                     decoded.mean, decoded.std, dataset.value, decoded.augment)


#: A recipe's dataset entry: which data, where, and how it is split and augmented
DATASET_KEYS = ("name", "root", "train_subset", "test_subset", "validation", "mean", "std", "augment")
#: What ``dataset_record`` adds, and ``load_splits`` checks the loaded data against
RECORD_KEYS = ("image_shape", "num_classes")
VALIDATION_SEED = 0  # fixed: every run and sweep of a dataset entry holds out the same images
MAX_CLASSES = 1 << 20
MAX_IMAGE_SIDE = 1 << 14


def check_dataset_record(record: typing.Any, where: str, error: type[Exception] = ConfigError, *,
                         stored: bool = False) -> dict:
    """Check a dataset entry (a recipe's) or record (what a file or checkpoint ``stored``: untrusted)
    before anything uses it: known keys only, each value of its type and range, and no ``root`` in a
    stored record (``dataset_record`` drops it: a file must not choose where data is read or downloaded).

    Raises:
        ``error`` (ConfigError by default; the file reader passes InvalidHeader) naming the key and value.
    """
    def fail(message: str) -> typing.NoReturn:
        raise error(f"{where}: {message}")

    def is_count(v, low: int = 0, high: int = 1 << 31) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high

    if not isinstance(record, dict):
        fail(f"a dataset entry must be a mapping, got {type(record).__name__}")
    unknown = sorted(set(record) - set(DATASET_KEYS) - set(RECORD_KEYS) | ({"root"} & set(record) if stored else set()),
                     key=str)
    if unknown:
        fail(f"unknown key(s) {unknown}; valid: {DATASET_KEYS + RECORD_KEYS}")
    if not isinstance(record.get("name"), str) or not record["name"]:
        fail(f"needs a 'name' string, got {record.get('name')!r}")
    if "root" in record and not isinstance(record["root"], str):
        fail(f"'root' must be a path string, got {record['root']!r}")
    for key in ("train_subset", "test_subset", "validation"):
        if record.get(key) is not None and not is_count(record[key]):
            fail(f"{key!r} must be a number of images >= 0, got {record[key]!r}")
    shape = record.get("image_shape")
    if shape is not None and not (isinstance(shape, (list, tuple)) and len(shape) == 3 and shape[0] in (1, 3)
                                  and all(is_count(d, 1, MAX_IMAGE_SIDE) for d in shape)):
        fail(f"'image_shape' must be [C, H, W] with C 1 or 3 and sides 1..{MAX_IMAGE_SIDE}, got {shape!r}")
    for key in ("mean", "std"):
        if key not in record:
            continue
        values = record[key]
        if not (isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            fail(f"{key!r} must be a list of 1 or 3 finite numbers (one per channel), got {values!r}")
        if key == "std" and min(values) <= 0:
            fail(f"'std' values must be positive, got {values!r}")
        if shape is not None and len(values) != shape[0]:
            fail(f"{key!r} has {len(values)} values for {shape[0]} channel(s)")
    if record.get("num_classes") is not None and not is_count(record["num_classes"], 1, MAX_CLASSES):
        fail(f"'num_classes' must be an integer 1..{MAX_CLASSES}, got {record['num_classes']!r}")
    if "augment" in record:
        try:
            enum_value(Augment, record["augment"], f"{where} augment")
        except ConfigError as e:
            raise error(str(e)) from None
    return record


class Splits(typing.NamedTuple):
    """A dataset entry's splits. ``validation`` (None unless the entry asks for one) is carved from the
    training split and never overlaps ``train``; anything that chooses reads it, ``test`` only reports."""

    train: ImageData
    validation: ImageData | None
    test: ImageData


def load_splits(dataset: dict, data_dir: str | Path | None = None) -> Splits:
    """(train, validation, test) for a recipe's dataset entry (or a checkpoint's or file's record).

    Keys: ``name``; optional ``root``, ``validation`` (N: the last N images of a fixed seeded
    permutation of the training split are held out for validation and removed from training),
    ``train_subset``/``test_subset`` (sizes, for quick runs; ``train_subset`` draws from what the
    validation split leaves), ``mean``/``std`` (normalisation a pretrained model expects, e.g.
    ImageNet statistics), ``augment`` (an ``Augment`` value for the training split, replacing the
    dataset's default) and the ``image_shape``/``num_classes`` of a ``dataset_record``, which the
    loaded data must match. ``data_dir`` replaces ``root``.

    Raises:
        ConfigError: unknown keys or bad values; DataError: the data does not match the recorded shape or classes.
    """
    check_dataset_record(dataset, "dataset")
    root = data_dir if data_dir is not None else dataset.get("root")

    def normalised(data: ImageData) -> ImageData:
        if "mean" in dataset or "std" in dataset:
            data = dataclasses.replace(data, mean=tuple(dataset.get("mean", data.mean)),
                                       std=tuple(dataset.get("std", data.std)))
        return data

    train_data = load_dataset(dataset["name"], root, "train")
    validation = None
    if dataset.get("validation"):
        train_data, validation = train_data.hold_out(dataset["validation"], seed=VALIDATION_SEED)
        validation = normalised(validation)
    if dataset.get("train_subset"):
        train_data = train_data.subset(dataset["train_subset"])
    if "augment" in dataset:
        train_data = dataclasses.replace(train_data, augment=dataset["augment"])
    test_data = load_dataset(dataset["name"], root, "test")
    if dataset.get("test_subset"):
        test_data = test_data.subset(dataset["test_subset"])
    _check_record(dataset, train_data, root)
    return Splits(normalised(train_data), validation, normalised(test_data))


def dataset_record(dataset: dict, data: ImageData) -> dict:
    """What checkpoints and compressed files record about their data: the dataset entry without its
    path (``root`` belongs to one machine), with the image shape, normalisation and class count the
    model saw, so ``eval FILE --data-dir D`` needs no ``--dataset`` and loads the data the same way."""
    record = {k: v for k, v in dataset.items() if k != "root"}
    record.update(image_shape=list(data.image_shape), num_classes=data.num_classes,
                  mean=list(data.mean), std=list(data.std))
    return record


def _check_record(dataset: dict, data: ImageData, root) -> None:
    where = f"dataset {dataset['name']!r}" + (f" in {root}" if root else "")
    shape = dataset.get("image_shape")
    if shape is not None and tuple(shape) != tuple(data.image_shape):
        raise DataError(f"{where}: images are {tuple(data.image_shape)} (C, H, W); the model was trained on "
                        f"{tuple(shape)}")
    classes = dataset.get("num_classes")
    if classes is not None and classes != data.num_classes:
        raise DataError(f"{where}: {data.num_classes} classes; the model was trained on {classes}")


# ---------------------------------------------------------------------------------------------------
# Batching


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop each image at a random offset after ``padding`` zero pixels on every side; shape is kept."""
    n, c, h, w = images.shape
    padded = images.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    sample = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[sample, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class Batches:
    """Iterate over ``(x, y)`` batches of an ``ImageData`` held as one uint8 tensor on ``device``.

    x is float32 (B, C, H, W), normalised with the data's mean/std; y is int64 (B,). Each epoch's order
    is ``torch.randperm`` seeded by ``seed + epoch`` (or the natural order without ``shuffle``). With
    ``world_size > 1`` each rank takes the strided shard ``order[rank::world_size]`` of that order,
    padded by repetition so every rank gets the same number of batches (as ``DistributedSampler``).
    ``set_epoch(e)`` picks the epoch of the next pass; each pass then advances it by one, so loops that
    never call it still get a new order every epoch. ``drop_last`` drops this rank's final short batch.

    Args:
        augment: True applies ``data.augment``; an ``Augment`` value chooses one; False applies none.
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool = False, augment: bool | str = False,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.augment = _augment_option(data.augment if augment is True else "none" if augment is False else augment)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x/255 - mean)/std as one multiply-subtract: x * scale - shift
        self._scale = (1 / (255 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)
        self.samples_per_rank = math.ceil(len(data) / world_size)
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (seed + epoch) for the next pass's order and augmentation."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in batch order (CPU int64)."""
        n = len(self.images)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        total = self.samples_per_rank * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices(epoch).to(self.device)
        generator = None
        if self.augment is not Augment.NONE:
            generator = torch.Generator(self.device).manual_seed((self.seed * 1_000_003 + epoch) * 1009 + self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            if self.augment is Augment.CROP_FLIP:
                x = random_flip(random_crop(x, 4, generator), generator)
            elif self.augment is Augment.SHIFT:
                x = random_crop(x, 2, generator)
            yield x.float().mul_(self._scale).sub_(self._shift), self.labels[idx]
