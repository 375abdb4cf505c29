"""Reading the official dataset files: MNIST's IDX, CIFAR-10's python batches and image folders.

Each reader returns a ``DecodedSplit`` (numpy arrays, classes, normalisation, default augmentation);
``data.load_dataset`` turns it into an ``ImageData``. Missing MNIST/CIFAR-10 files are downloaded from
the official URLs (MD5-checked). Decoded splits are cached as ``.npy`` files in ``$DEEPSHRINK_CACHE``
(default ``~/.cache/deepshrink``), keyed by the source files' paths, sizes and mtimes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import json
import logging
import math
import os
import pickle
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .files import atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CACHE_VERSION = 1  # bump when the decoded layout changes, so old cache entries are never read
DOWNLOAD_TIMEOUT_S = 30  # per socket operation; an offline machine fails fast instead of hanging

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: MD5 of the official downloads (checked after every download).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DecodedSplit:
    """A decoded split as numpy arrays plus the metadata cached beside them, and its default augmentation."""

    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # a data.Augment value: what training applies by default


def _pixel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale, exact, via per-chunk histograms (no float copy of the data)."""
    channels = images.shape[1]
    hist = np.zeros((channels, 256), np.int64)
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096]
        for c in range(channels):
            hist[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    levels = np.arange(256) / 255.0
    count = np.maximum(hist.sum(1), 1)
    mean = hist @ levels / count
    var = np.maximum(hist @ levels**2 / count - mean**2, 0.0)
    return tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-4), 4) for s in np.sqrt(var))


# --- cache ---


def cache_dir() -> Path:
    """Where decoded splits are cached: ``$DEEPSHRINK_CACHE``, else ``~/.cache/deepshrink``."""
    env = os.environ.get("DEEPSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepshrink"


def _file_entries(base: Path, paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    entries = []
    for p in paths:
        st = p.stat()
        entries.append((p.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns))
    return entries


def _cached(kind: str, split: str, base: Path, entries: list, build: Callable[[], DecodedSplit]) -> DecodedSplit:
    """Return the cached decode of these source files, or ``build()`` it and cache it (best effort)."""
    ident = json.dumps([CACHE_VERSION, kind, split, str(base.resolve()), entries])
    stem = cache_dir() / f"{kind}-{split}-{hashlib.sha256(ident.encode()).hexdigest()[:32]}"
    hit = _read_cache(stem)
    if hit is not None:
        log.debug("%s %s: cache hit %s", kind, split, stem)
        return hit
    decoded = build()
    try:
        # arrays first, JSON last: the JSON is the commit marker a reader checks the arrays against
        atomic_write(f"{stem}.images.npy", lambda f: np.save(f, decoded.images, allow_pickle=False))
        atomic_write(f"{stem}.labels.npy", lambda f: np.save(f, decoded.labels, allow_pickle=False))
        meta = {"shape": list(decoded.images.shape), "classes": list(decoded.classes),
                "mean": list(decoded.mean), "std": list(decoded.std), "source": str(base.resolve())}
        atomic_write(f"{stem}.json", lambda f: f.write(json.dumps(meta).encode()))
        log.info("%s %s: cached %d images in %s", kind, split, len(decoded.images), stem.parent)
    except OSError as e:  # a read-only home must not stop training
        log.warning("%s %s: could not write cache in %s (%s)", kind, split, stem.parent, e)
    return decoded


def _read_cache(stem: Path) -> DecodedSplit | None:
    meta_path = Path(f"{stem}.json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(f"{stem}.images.npy", allow_pickle=False)
        labels = np.load(f"{stem}.labels.npy", allow_pickle=False)
        shape = tuple(meta["shape"])
        if images.dtype != np.uint8 or images.shape != shape or labels.dtype != np.int64 or labels.shape != shape[:1]:
            raise ValueError(f"arrays {images.dtype}{images.shape}/{labels.dtype}{labels.shape} do not match {shape}")
        classes = tuple(str(c) for c in meta["classes"])
        mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
        if len(mean) != shape[1] or len(std) != shape[1]:
            raise ValueError("mean/std length does not match the channel count")
        return DecodedSplit(images, labels, classes, mean, std)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        log.warning("ignoring corrupt cache entry %s (%s); rebuilding it", stem, e)
        return None


# --- downloads ---


def _open_url(url: str):
    """Open ``url`` for reading (tests replace this function; nothing else touches the network)."""
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` (temp file, then rename) and check it against ``OFFICIAL_MD5``.

    Raises:
        OSError / http.client.HTTPException: the machine is offline or the transfer failed.
        DataError: the file arrived but its MD5 is not the official one.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s -> %s", url, dest)
    try:
        with _open_url(url) as response, open(tmp, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
        expected = OFFICIAL_MD5[dest.name]
        if digest.hexdigest() != expected:
            raise DataError(f"{url}: downloaded file has MD5 {digest.hexdigest()}, expected {expected}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _missing_files_error(dataset: str, paths: Sequence[Path], url: str, reason: str) -> DataError:
    listing = "\n  ".join(str(p) for p in paths)
    return DataError(f"{dataset}: missing files ({reason}). Put these files there:\n  {listing}\n(from {url})")


# --- digits ---


def _load_digits(split: str) -> DecodedSplit:
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only digits needs it

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    # stratified 80/20 split from a fixed seed, done here so it never depends on scikit-learn's version
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(0.2 * len(members))]] = True
    mean, std = _pixel_stats(images[~test])  # train statistics normalise both splits
    keep = test if split == "test" else ~test
    return DecodedSplit(images[keep], labels[keep], tuple(str(c) for c in range(10)), mean, std)


# --- MNIST ---


def _load_mnist(root: Path, split: str, download: bool) -> DecodedSplit:
    names = MNIST_FILES[split]
    found = _find_mnist(root, names)
    if found is None:
        target = root / "MNIST" / "raw"
        wanted = [target / n for n in names]
        if not download:
            raise _missing_files_error("mnist", wanted, MNIST_URL, "download=False")
        try:
            for path in wanted:
                if not path.is_file():
                    _download(MNIST_URL + path.name, path)
        except (OSError, http.client.HTTPException) as e:
            raise _missing_files_error("mnist", wanted, MNIST_URL, f"download failed: {e}") from None
        found = tuple(wanted)
    images_path, labels_path = found
    base = images_path.parent

    def build() -> DecodedSplit:
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if len(labels) != len(images):
            raise DataError(f"{labels_path}: {len(labels)} labels, but {images_path} holds {len(images)} images")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{labels_path}: label {int(labels.max())} found, expected digits 0..9")
        return DecodedSplit(images[:, None], labels.astype(np.int64), tuple(str(c) for c in range(10)),
                      (0.1307,), (0.3081,))

    return _cached("mnist", split, base, _file_entries(base, found), build)


def _find_mnist(root: Path, names: Sequence[str]) -> tuple[Path, ...] | None:
    """The split's files in the first folder that has them all (gzipped or not), or None."""
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        paths = []
        for name in names:
            candidates = [folder / name, folder / name.removesuffix(".gz")]
            paths.append(next((p for p in candidates if p.is_file()), None))
        if all(paths):
            return tuple(paths)
    return None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if it ends in .gz) into a (dims...) uint8 array.

    The header is a 4-byte big-endian magic ``0x00000800 + ndim`` and ``ndim`` big-endian u32 sizes;
    the payload must hold exactly prod(sizes) bytes.

    Raises:
        DataError: wrong magic, truncated header or payload, trailing bytes, or an unreadable gzip stream.
    """
    path = Path(path)
    header_len = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(header_len)
            magic = int.from_bytes(head[:4], "big")
            if len(head) >= 4 and magic != 0x0800 + ndim:
                raise DataError(f"{path}: IDX magic 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
                                f"(unsigned bytes, {ndim} dimension(s))")
            if len(head) < header_len:
                raise DataError(f"{path}: truncated header: expected {header_len} bytes, got {len(head)}")
            dims = tuple(int.from_bytes(head[i:i + 4], "big") for i in range(4, header_len, 4))
            expected = math.prod(dims)
            # read in chunks so a lying header cannot make us allocate more than the file holds
            payload = bytearray()
            while len(payload) < expected:
                chunk = f.read(min(1 << 24, expected - len(payload)))
                if not chunk:
                    break
                payload += chunk
            if len(payload) < expected:
                raise DataError(f"{path}: truncated: header declares {dims}, so expected {header_len + expected} "
                                f"bytes (uncompressed), got {header_len + len(payload)}")
            if f.read(1):
                raise DataError(f"{path}: trailing data after the {header_len + expected} bytes "
                                f"its header {dims} declares")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable, corrupt or truncated ({type(e).__name__}: {e})") from None
    return np.frombuffer(payload, np.uint8).reshape(dims)  # a bytearray: writable, no copy


# --- CIFAR-10 ---

# The official batches are Python 2 pickles of dicts holding str, list, int and one uint8 ndarray.
# Rebuilding that ndarray needs exactly three numpy globals: the array reconstructor (spelt
# numpy.core.multiarray in old pickles, numpy._core.multiarray in numpy>=2 pickles), ndarray and dtype.
# Every other global is refused, so a crafted file cannot name a callable such as os.system.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # the reconstructor itself, whatever its module path
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}: only numpy arrays are allowed") from None


def read_cifar_batch(path: str | os.PathLike) -> dict:
    """Read one official CIFAR python batch (or batches.meta) with a restricted unpickler; keys become str.

    Raises:
        DataError: unreadable file, forbidden global, or not a dict.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 byte strings into str without loss (what numpy expects for array data)
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a malformed pickle can raise almost any exception type
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_cifar10(root: Path, split: str, download: bool) -> DecodedSplit:
    folder = root if (root / "batches.meta").is_file() or (root / "test_batch").is_file() else root / CIFAR10_DIR
    wanted = [folder / n for n in (*CIFAR10_FILES[split], "batches.meta")]
    missing = [p for p in wanted if not p.is_file()]
    if missing:
        archive = root / "cifar-10-python.tar.gz"
        reason = "download=False"
        try:
            if archive.is_file() or download:
                if not archive.is_file():
                    _download(CIFAR10_URL, archive)
                _extract(archive, root)
                folder = root / CIFAR10_DIR
                wanted = [folder / n for n in (*CIFAR10_FILES[split], "batches.meta")]
                missing = [p for p in wanted if not p.is_file()]
                reason = f"not in {archive}"
        except (OSError, http.client.HTTPException) as e:
            reason = f"download failed: {e}"
        if missing:
            raise _missing_files_error("cifar10", missing, CIFAR10_URL, reason)

    def build() -> DecodedSplit:
        meta = read_cifar_batch(folder / "batches.meta")
        names = meta.get("label_names")
        if not isinstance(names, list) or not names:
            raise DataError(f"{folder / 'batches.meta'}: expected a non-empty 'label_names' list")
        classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
        images, labels = [], []
        for path in wanted[:-1]:
            batch = read_cifar_batch(path)
            data, batch_labels = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise DataError(f"{path}: 'data' must be a uint8 (N, 3072) array, got {got}")
            try:
                batch_labels = np.asarray(batch_labels, dtype=np.int64)
            except (TypeError, ValueError):
                raise DataError(f"{path}: 'labels' must be a list of ints") from None
            if batch_labels.shape != data.shape[:1]:
                raise DataError(f"{path}: {batch_labels.size} labels for {len(data)} images")
            if batch_labels.size and not 0 <= batch_labels.min() <= batch_labels.max() < len(classes):
                raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes, each 32x32 row-major
            labels.append(batch_labels)
        return DecodedSplit(np.concatenate(images), np.concatenate(labels), classes,
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

    entries = _file_entries(folder, wanted)
    return dataclasses.replace(_cached("cifar10", split, folder, entries, build), augment="crop_flip")


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a tar.gz safely (the "data" filter refuses absolute paths, links out of ``dest`` and devices)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from None


# --- image folders ---


def _load_imagefolder(root: Path, split: str) -> DecodedSplit:
    decoded = _imagefolder_split(root, split)
    mean, std = decoded.mean, decoded.std
    if split != "train" and (root / "train").is_dir():
        train = _imagefolder_split(root, "train")  # normalise with train statistics (cached after the first call)
        if train.classes != decoded.classes:
            raise DataError(f"{root}: train classes {list(train.classes)} differ from "
                            f"{split} classes {list(decoded.classes)}")
        mean, std = train.mean, train.std
    _, channels, height, width = decoded.images.shape
    augment = "crop_flip" if (channels, height, width) == (3, 32, 32) else "none"  # CIFAR-like images
    return DecodedSplit(decoded.images, decoded.labels, decoded.classes, mean, std, augment)


def _imagefolder_split(root: Path, split: str) -> DecodedSplit:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; an image folder is {root}/{{train,test}}/<class>/*.png|jpg|jpeg")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    files, labels, entries = [], [], []
    for label, name in enumerate(classes):
        found = sorted((e for e in os.scandir(folder / name)
                        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES)),
                       key=lambda e: e.name)
        for e in found:
            st = e.stat()
            files.append(e.path)
            labels.append(label)
            entries.append((f"{name}/{e.name}", st.st_size, st.st_mtime_ns))
    if not files:
        raise DataError(f"{folder}: no .png/.jpg/.jpeg images in class folders (expected {folder}/<class>/*.png)")

    def build() -> DecodedSplit:
        images = _decode_images(files)
        mean, std = _pixel_stats(images)  # statistics of this split's own pixels, cached with it
        return DecodedSplit(images, np.asarray(labels, np.int64), tuple(classes), mean, std)

    return _cached("imagefolder", split, folder, entries, build)


def _decode_images(files: Sequence[str]) -> np.ndarray:
    """Decode same-size images into uint8 (N, C, H, W): C=1 if every image is grayscale, else RGB."""
    from PIL import Image

    def decode(path: str) -> tuple[np.ndarray, bool]:
        try:
            with Image.open(path) as img:
                gray = img.mode in ("1", "L", "LA")
                return np.asarray(img.convert("L" if gray else "RGB")), gray
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None

    first, _ = decode(files[0])
    height, width = first.shape[:2]
    out = np.empty((len(files), 3, height, width), np.uint8)
    gray = np.zeros(len(files), bool)

    def decode_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            pixels, gray[i] = decode(files[i])
            if pixels.shape[:2] != (height, width):
                raise DataError(f"{files[i]}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height} "
                                f"like {files[0]} (all images in a folder must share one size)")
            out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    # PIL releases the GIL while decoding, so threads overlap the decode work
    step = 512
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(decode_range, s, min(s + step, len(files))) for s in range(0, len(files), step)]
        try:
            for job in jobs:
                job.result()
        except BaseException:
            for job in jobs:  # fail fast instead of decoding the rest of the folder
                job.cancel()
            raise
    return out[:, :1].copy() if gray.all() else out



def read_split(dataset: str, root: Path, split: str, download: bool) -> DecodedSplit:
    """One split of a built-in dataset (a ``data.DatasetName`` value), decoded (cached after the first call)."""
    if dataset == "digits":
        return _load_digits(split)
    if dataset == "mnist":
        return _load_mnist(root, split, download)
    if dataset == "cifar10":
        return _load_cifar10(root, split, download)
    return _load_imagefolder(root, split)
