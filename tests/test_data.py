"""Datasets: official-format parsing (synthetic files), safety of the CIFAR unpickler, caching, Batches."""

from __future__ import annotations

import dataclasses

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepshrink import dataset_files
from deepshrink.data import Augment, Batches, ImageData, load_dataset, random_crop
from deepshrink.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache dir, and nothing can reach the network."""
    monkeypatch.setenv("DEEPSHRINK_CACHE", str(tmp_path / "cache"))

    def offline(url):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(dataset_files, "_open_url", offline)


# --- synthetic official files ---


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, cut: int = 0) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped if the name ends in .gz; ``cut`` drops trailing bytes."""
    magic = 0x0800 + array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_mnist(folder: Path, split: str = "train", n: int = 20, seed: int = 0, gz: bool = True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    image_name, label_name = dataset_files.MNIST_FILES[split]
    if not gz:
        image_name, label_name = image_name.removesuffix(".gz"), label_name.removesuffix(".gz")
    write_idx(folder / image_name, images)
    write_idx(folder / label_name, labels)
    return images, labels


def make_cifar(folder: Path, n_per_batch: int = 3, seed: int = 0, byte_keys: bool = True):
    """Official layout: data_batch_1..5, test_batch, batches.meta; returns {file: (data, labels)}."""
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in (*dataset_files.CIFAR10_FILES["train"], "test_batch"):
        rows = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batch = {key("batch_label"): key(name), key("labels"): labels, key("data"): rows, key("filenames"): []}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        written[name] = (rows, labels)
    meta = {key("label_names"): [key(c) for c in dataset_files.CIFAR10_CLASSES], key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return written


def py2_batch_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official Python 2 files are (protocol 2, byte strings, numpy.core)."""
    def short(s: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(s)]) + s

    def int4(v: int) -> bytes:  # BININT (signed little-endian)
        return b"J" + struct.pack("<i", v)

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + int4(0) + b"\x85" + short(b"b") + b"\x87R"
             + b"(" + int4(1) + int4(rows.shape[0]) + int4(rows.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + short(b"u1") + int4(0) + int4(1) + b"\x87R"
             + b"(" + int4(3) + short(b"|") + b"NNN" + int4(-1) + int4(-1) + int4(0) + b"tb"
             + b"\x89" + b"T" + struct.pack("<I", rows.nbytes) + rows.tobytes() + b"tb")
    label_list = b"](" + b"".join(int4(v) for v in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


def planes_to_image(rows: np.ndarray) -> np.ndarray:
    """Official row layout by hand: pixel (c, y, x) is rows[:, c*1024 + y*32 + x]."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return rows[:, c * 1024 + y * 32 + x]


def make_image_folder(root: Path, sizes=((32, 32),), mode: str = "RGB", per_class: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("train", "test"):
        for cls in ("cat", "ant"):  # deliberately unsorted: classes must come out sorted
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                path = root / split / cls / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode).save(path)
                written[(split, cls, i)] = pixels
    return written


# --- dataset selection ---


def test_unknown_dataset_and_split_raise_config_error_listing_choices():
    with pytest.raises(ConfigError, match="cifar10.*imagefolder"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="valid.*train.*test"):
        load_dataset("digits", split="val")


# --- digits ---


def test_digits_split_is_deterministic_stratified_and_partitions_the_dataset():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    for d in (train, test):
        assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
        assert d.images.shape[1:] == (1, 8, 8) and d.name == "digits" and d.augment == Augment.NONE
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.mean == test.mean and train.std == test.std
    again = load_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)

    full = load_digits()
    expected_images = np.rint(full.images * 255 / 16).astype(np.uint8)
    # train + test is exactly the dataset as a multiset of (image, label): no overlap, nothing lost
    def rows(images, labels):
        return sorted(bytes(im.reshape(-1)) + bytes([lab]) for im, lab in zip(images, labels))
    both = rows(torch.cat([train.images, test.images]).numpy(), torch.cat([train.labels, test.labels]).numpy())
    assert both == rows(expected_images, full.target)
    per_class = np.bincount(full.target)
    assert np.array_equal(test.labels.bincount().numpy(), np.round(0.2 * per_class).astype(int))


# --- MNIST ---


@pytest.mark.parametrize("layout", ["MNIST/raw", "raw", ".", "uncompressed"])
def test_mnist_idx_files_load_exactly_from_each_accepted_layout(tmp_path, layout):
    folder = tmp_path / ("MNIST/raw" if layout == "uncompressed" else layout)
    images, labels = make_mnist(folder, "test", n=20, gz=layout != "uncompressed")
    d = load_dataset("mnist", tmp_path, "test", download=False)
    assert d.images.shape == (20, 1, 28, 28) and d.images.dtype == torch.uint8
    assert np.array_equal(d.images[:, 0].numpy(), images)
    assert np.array_equal(d.labels.numpy(), labels.astype(np.int64))
    assert d.mean == (0.1307,) and d.std == (0.3081,) and d.classes == tuple("0123456789")


def test_mnist_truncated_payload_names_file_and_byte_counts(tmp_path):
    make_mnist(tmp_path / "MNIST/raw", "train", n=5)
    bad = write_idx(tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8), cut=100)
    full = 16 + 5 * 28 * 28
    with pytest.raises(DataError, match=rf"{bad.name}.*expected {full} bytes.*got {full - 100}"):
        load_dataset("mnist", tmp_path, download=False)


def test_mnist_cut_gzip_stream_is_a_data_error(tmp_path):
    make_mnist(tmp_path, "train", n=5)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=path.name):
        load_dataset("mnist", tmp_path, download=False)


def test_mnist_wrong_magic_trailing_bytes_count_mismatch_and_bad_labels(tmp_path):
    raw = tmp_path / "MNIST/raw"
    make_mnist(raw, "train", n=5)
    labels_path = raw / "train-labels-idx1-ubyte.gz"
    write_idx(labels_path, np.zeros(5, np.uint8), magic=0x0803)
    with pytest.raises(DataError, match=rf"{labels_path.name}.*magic 0x00000803, expected 0x00000801"):
        load_dataset("mnist", tmp_path, download=False)
    labels_path.write_bytes(gzip.compress(struct.pack(">II", 0x0801, 5) + bytes(6)))
    with pytest.raises(DataError, match=rf"{labels_path.name}.*trailing"):
        load_dataset("mnist", tmp_path, download=False)
    write_idx(labels_path, np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=rf"{labels_path.name}: 4 labels.*5 images"):
        load_dataset("mnist", tmp_path, download=False)
    write_idx(labels_path, np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(DataError, match=rf"{labels_path.name}: label 10"):
        load_dataset("mnist", tmp_path, download=False)


def test_mnist_missing_files_offline_names_where_to_put_them(tmp_path):
    expected = [str(tmp_path / "MNIST" / "raw" / n) for n in dataset_files.MNIST_FILES["test"]]
    for download in (False, True):  # True: the fixture makes every download fail like an offline machine
        with pytest.raises(DataError) as err:
            load_dataset("mnist", tmp_path, "test", download=download)
        assert all(p in str(err.value) for p in expected)
        assert dataset_files.MNIST_URL in str(err.value)
    assert "download failed" in str(err.value)


def fake_server(monkeypatch, files: dict[str, bytes], md5s: dict[str, str] | None = None):
    """Serve ``files`` by URL basename and declare their MD5s official."""
    monkeypatch.setattr(dataset_files, "_open_url", lambda url: io.BytesIO(files[url.rsplit("/", 1)[1]]))
    table = dict(dataset_files.OFFICIAL_MD5)
    table.update(md5s if md5s is not None else {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    monkeypatch.setattr(dataset_files, "OFFICIAL_MD5", table)


def test_mnist_download_checks_md5_and_stores_in_torchvision_layout(tmp_path, monkeypatch):
    source = tmp_path / "served"
    images, labels = make_mnist(source, "test", n=7)
    served = {p.name: p.read_bytes() for p in source.iterdir()}
    root = tmp_path / "root"
    fake_server(monkeypatch, served, md5s={name: "0" * 32 for name in served})
    with pytest.raises(DataError, match="MD5"):
        load_dataset("mnist", root, "test")
    assert not list((root / "MNIST" / "raw").iterdir())  # nothing half-downloaded left behind
    fake_server(monkeypatch, served)
    d = load_dataset("mnist", root, "test")
    assert np.array_equal(d.images[:, 0].numpy(), images)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(served)


# --- CIFAR-10 ---


@pytest.mark.parametrize("byte_keys", [True, False])
def test_cifar_batches_load_exactly_in_plane_order(tmp_path, byte_keys):
    written = make_cifar(tmp_path / "cifar-10-batches-py", byte_keys=byte_keys)
    train = load_dataset("cifar10", tmp_path, "train", download=False)
    rows = np.concatenate([written[n][0] for n in dataset_files.CIFAR10_FILES["train"]])
    assert train.images.shape == (15, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), planes_to_image(rows))
    assert train.labels.tolist() == sum((written[n][1] for n in dataset_files.CIFAR10_FILES["train"]), [])
    assert train.classes == dataset_files.CIFAR10_CLASSES and train.augment == Augment.CROP_FLIP
    # root may also be the batches folder itself
    test = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test", download=False)
    assert np.array_equal(test.images.numpy(), planes_to_image(written["test_batch"][0]))


def test_cifar_python2_official_pickle_format_loads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    rows = np.random.default_rng(5).integers(0, 256, (4, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(py2_batch_pickle(rows, [9, 0, 3, 3]))
    d = load_dataset("cifar10", tmp_path, "test", download=False)
    assert np.array_equal(d.images.numpy(), planes_to_image(rows)) and d.labels.tolist() == [9, 0, 3, 3]


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_forbidden_global_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": RunsCode(marker), "labels": []}))
    with pytest.raises(DataError, match=r"test_batch.*refusing global (posix|os)\.system"):
        load_dataset("cifar10", tmp_path, "test", download=False)
    assert not marker.exists()


def test_cifar_wrong_data_shape_and_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    wrong_shape = {"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(wrong_shape, protocol=4))
    with pytest.raises(DataError, match=r"test_batch: 'data' must be a uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, "test", download=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=str(folder / "data_batch_3")) as err:
        load_dataset("cifar10", tmp_path, "train", download=True)  # the fixture makes the download fail
    assert dataset_files.CIFAR10_URL in str(err.value) and "data_batch_1" not in str(err.value)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_cifar_download_is_md5_checked_and_extracted_safely(tmp_path, monkeypatch):
    staged = tmp_path / "staged"
    written = make_cifar(staged)
    archive = tar_gz({f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in staged.iterdir()})
    fake_server(monkeypatch, {"cifar-10-python.tar.gz": archive})
    d = load_dataset("cifar10", tmp_path / "root", "test")
    assert np.array_equal(d.images.numpy(), planes_to_image(written["test_batch"][0]))

    evil = tar_gz({"../escaped": b"x"})
    fake_server(monkeypatch, {"cifar-10-python.tar.gz": evil})
    with pytest.raises(DataError, match="cannot extract"):
        load_dataset("cifar10", tmp_path / "other", "test")
    assert not (tmp_path / "escaped").exists()


# --- image folders ---


def test_image_folder_loads_sorted_classes_exact_pixels_and_train_stats(tmp_path):
    written = make_image_folder(tmp_path)
    train, test = load_dataset("imagefolder", tmp_path, "train"), load_dataset("imagefolder", tmp_path, "test")
    assert train.classes == ("ant", "cat") and train.images.shape == (6, 3, 32, 32)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(train.images[4].numpy(), written[("train", "cat", 1)].transpose(2, 0, 1))
    assert train.augment == Augment.CROP_FLIP
    pixels = train.images.double() / 255
    assert np.allclose(train.mean, pixels.mean((0, 2, 3)).numpy(), atol=1e-4)
    assert np.allclose(train.std, pixels.std((0, 2, 3), correction=0).numpy(), atol=1e-4)
    assert test.mean == train.mean and test.std == train.std  # test data is normalised like train


def test_image_folder_grayscale_mixed_sizes_and_missing_split(tmp_path):
    written = make_image_folder(tmp_path / "gray", sizes=((20, 12),), mode="L")
    d = load_dataset("imagefolder", tmp_path / "gray", "test")
    assert d.images.shape == (6, 1, 20, 12) and d.augment == Augment.NONE
    assert np.array_equal(d.images[0, 0].numpy(), written[("test", "ant", 0)])
    make_image_folder(tmp_path / "mixed", sizes=((32, 32), (28, 28)))
    with pytest.raises(DataError, match=r"001\.png: image is 28x28, expected 32x32"):
        load_dataset("imagefolder", tmp_path / "mixed", "train")
    broken = tmp_path / "gray" / "train" / "cat" / "002.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{broken}: cannot decode image"):
        load_dataset("imagefolder", tmp_path / "gray", "train")
    with pytest.raises(DataError, match=str(tmp_path / "nothing" / "train")):
        load_dataset("imagefolder", tmp_path / "nothing", "train")


# --- cache ---


def test_cache_is_reused_invalidated_by_source_changes_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST/raw"
    make_mnist(raw, "test", n=6, gz=False)  # uncompressed: a rewrite keeps the size, only the mtime tells
    first = load_dataset("mnist", tmp_path, "test")
    cache_files = sorted((tmp_path / "cache").iterdir())
    assert [p.suffix for p in cache_files] == [".npy", ".json", ".npy"]

    real_read_idx = dataset_files.read_idx
    monkeypatch.setattr(dataset_files, "read_idx", lambda *a, **k: pytest.fail("cache not used"))
    assert torch.equal(load_dataset("mnist", tmp_path, "test").images, first.images)

    monkeypatch.setattr(dataset_files, "read_idx", real_read_idx)
    images_npy = next(p for p in cache_files if p.name.endswith(".images.npy"))
    images_npy.write_bytes(b"garbage")
    assert torch.equal(load_dataset("mnist", tmp_path, "test").images, first.images)
    assert np.array_equal(np.load(images_npy), first.images.numpy())  # the entry was rewritten

    labels_path = raw / "t10k-labels-idx1-ubyte"
    size, mtime = labels_path.stat().st_size, labels_path.stat().st_mtime_ns
    write_idx(labels_path, np.full(6, 7, np.uint8))
    os.utime(labels_path, ns=(mtime + 10**10, mtime + 10**10))
    assert labels_path.stat().st_size == size
    assert load_dataset("mnist", tmp_path, "test").labels.tolist() == [7] * 6


# --- ImageData ---


def small_data(n: int = 10, channels: int = 3, size: int = 6, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % 3, ("a", "b", "c"), (0.5,) * channels, (0.25,) * channels,
                     "toy", Augment.CROP_FLIP)


def test_image_data_validates_and_subsets_deterministically():
    d = small_data(10)
    with pytest.raises(DataError, match="labels span 0..3"):
        ImageData(d.images, torch.arange(10) % 4, d.classes, d.mean, d.std, "toy")
    with pytest.raises(DataError, match="uint8"):
        ImageData(d.images.float(), d.labels, d.classes, d.mean, d.std, "toy")
    a, b = d.subset(4, seed=1), d.subset(4, seed=1)
    assert len(a) == 4 and torch.equal(a.images, b.images) and a.augment == Augment.CROP_FLIP
    assert not torch.equal(a.images, d.subset(4, seed=2).images)
    assert all(any(torch.equal(x, y) for y in d.images) for x in a.images)
    assert len(d.subset(50)) == 10


# --- Batches ---


def epoch_order(batches: Batches) -> list[int]:
    """Sample ids served in one pass; labels hold the ids."""
    return torch.cat([y for _, y in batches]).tolist()


def id_data(n: int) -> ImageData:
    return ImageData(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), tuple(map(str, range(n))),
                     (0.0,), (1.0,), "ids")


def test_batches_cover_every_sample_once_and_shuffle_deterministically():
    d = id_data(23)
    plain = Batches(d, 5)
    assert len(plain) == 5 and epoch_order(plain) == list(range(23))
    shuffled = Batches(d, 5, shuffle=True, seed=3)
    first = epoch_order(shuffled)
    assert sorted(first) == list(range(23)) and first != list(range(23))
    assert epoch_order(Batches(d, 5, shuffle=True, seed=3)) == first
    assert epoch_order(shuffled) != first  # each pass advances the epoch
    shuffled.set_epoch(0)
    assert epoch_order(shuffled) == first
    shuffled.set_epoch(1)
    assert epoch_order(shuffled) != first
    dropped = Batches(d, 5, drop_last=True)
    assert len(dropped) == 4 and [len(y) for _, y in dropped] == [5, 5, 5, 5]


@pytest.mark.parametrize("n,world", [(12, 3), (10, 3), (5, 4)])
def test_rank_shards_are_equal_disjoint_strided_and_cover_the_data(n, world):
    shards = [epoch_order(Batches(id_data(n), 2, shuffle=True, seed=7, rank=r, world_size=world)) for r in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    assert len({len(Batches(id_data(n), 2, rank=r, world_size=world)) for r in range(world)}) == 1
    served = sum(shards, [])
    assert sorted(set(served)) == list(range(n))
    assert len(served) - len(set(served)) == per_rank * world - n  # only the padding repeats
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert shards[0][: len(order[::world])] == order[::world]
    with pytest.raises(ConfigError, match="rank 3"):
        Batches(id_data(n), 2, rank=3, world_size=3)


def test_batches_normalise_with_dataset_mean_and_std():
    d = small_data(7)
    x, y = next(iter(Batches(d, 7)))
    expected = (d.images.float() / 255 - 0.5) / 0.25
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, expected, atol=1e-5) and torch.equal(y, d.labels)


def test_augmentation_is_a_zero_padded_crop_possibly_mirrored():
    d = small_data(64, size=8)
    x, y = next(iter(Batches(d, 64, augment=True, seed=1)))
    assert x.shape == d.images.shape
    pixels = torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)
    padded = torch.nn.functional.pad(d.images, (4, 4, 4, 4))
    seen = set()
    for i in range(64):
        matches = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(pixels[i], (lambda c: c.flip(2) if flip else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))}
        assert matches, f"sample {i} is not a crop/flip of its source"
        seen |= matches
    assert {flip for _, _, flip in seen} == {False, True} and len({(dy, dx) for dy, dx, _ in seen}) > 10
    again = next(iter(Batches(d, 64, augment=True, seed=1)))[0]
    assert torch.equal(again, x)  # augmentation is seeded too
    unaugmented = next(iter(Batches(d, 64, augment=False)))[0]
    assert torch.allclose(unaugmented, (d.images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_shift_augmentation_translates_by_at_most_two_pixels_without_flipping():
    d = dataclasses.replace(small_data(64, channels=1, size=8), augment=Augment.SHIFT)
    x, _ = next(iter(Batches(d, 64, augment=True, seed=3)))
    pixels = torch.round((x * 0.25 + 0.5) * 255).to(torch.uint8)
    padded = torch.nn.functional.pad(d.images, (2, 2, 2, 2))
    shifts = set()
    for i in range(64):
        found = {(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(pixels[i], padded[i, :, dy:dy + 8, dx:dx + 8])}
        assert found, f"sample {i} is not a shift of its source"
        shifts |= found
    assert len(shifts) > 10  # many offsets drawn; a flip would match none of them


def test_random_crop_keeps_pixels_in_zero_padded_window():
    images = torch.full((50, 1, 4, 4), 9, dtype=torch.uint8)
    out = random_crop(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and set(out.unique().tolist()) == {0, 9}
    assert (out == 9).sum((1, 2, 3)).min() >= 4  # at most 2 rows/cols shifted out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_cpu():
    d = small_data(33, size=8)
    cpu = list(Batches(d, 8, shuffle=True, seed=2))
    gpu = list(Batches(d, 8, shuffle=True, seed=2, device="cuda"))
    assert len(gpu) == len(cpu)
    for (x_gpu, y_gpu), (x_cpu, y_cpu) in zip(gpu, cpu):
        assert torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-6) and torch.equal(y_gpu.cpu(), y_cpu)
    x, y = next(iter(Batches(d, 33, augment=True, device="cuda")))
    assert x.is_cuda and x.shape == d.images.shape


# --- the shared real datasets ---


@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_shared_mnist_has_official_sizes_and_statistics(split, n):
    root = SHARED / "mnist"
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"shared MNIST not found at {root}")
    d = load_dataset("mnist", root, split, download=False)
    assert d.images.shape == (n, 1, 28, 28)
    counts = d.labels.bincount(minlength=10)
    assert len(counts) == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
    if split == "test":
        assert abs(float(d.images.double().mean()) / 255 - 0.13) < 0.005


def test_shared_cifar10_jpeg_test_split_loads(tmp_path):
    source = SHARED / "cifar10-jpeg" / "test"
    if not source.is_dir():
        pytest.skip(f"shared cifar10-jpeg not found at {source}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "test").symlink_to(source)  # test split only: skip decoding 50k train images
    d = load_dataset("imagefolder", tmp_path / "folder", "test")
    assert d.images.shape == (10000, 3, 32, 32) and d.classes == dataset_files.CIFAR10_CLASSES
    assert d.labels.bincount().tolist() == [1000] * 10 and d.augment == Augment.CROP_FLIP
    assert np.allclose(d.mean, (0.4914, 0.4822, 0.4465), atol=0.01)


def test_hold_out_is_a_fixed_disjoint_carve_out_in_original_order():
    d = ImageData(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous(),
                  torch.arange(20) % 3, ("a", "b", "c"), (0.5,), (0.25,), "toy")
    rest, held = d.hold_out(5, seed=0)
    ids = lambda x: x.images[:, 0, 0, 0].tolist()  # noqa: E731 - each image's pixel is its index
    assert len(rest) == 15 and len(held) == 5
    assert sorted(ids(rest) + ids(held)) == list(range(20))  # disjoint and complete
    assert ids(rest) == sorted(ids(rest)) and ids(held) == sorted(ids(held))
    assert ids(d.hold_out(5, seed=0)[1]) == ids(held) and ids(d.hold_out(5, seed=1)[1]) != ids(held)
    assert set(ids(rest.subset(10))) <= set(ids(rest))  # a subset of the rest never reaches validation
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match="cannot hold out"):
            d.hold_out(bad)
