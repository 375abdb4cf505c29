"""NNCodec side of bench/nnc.py: runs in NNCodec's own environment, never imports deepshrink.

Usage: ``NNC_PYTHON bench/nnc_worker.py [--stages] IN.npz OUT_DIR [--bnf BLOCKS.json] [--options OPTIONS.json] QP [QP ...]``. For each qp:
``nncodec.nnc.compress`` of the float32/int32 arrays of IN.npz into OUT_DIR/qp<QP>.nnc (NNCodec's
defaults otherwise: dependent quantization, DeepCABAC, biases at nonweight_qp -75), ``nncodec.nnc.decompress``
of that file into OUT_DIR/qp<QP>.npz, and one JSON line ``{"qp", "bytes", "seconds"}`` on stdout.
``--bnf`` turns on NNCodec's BatchNorm folding, given its ``block_id_and_param_type`` map (which
weight, bias and BatchNorm tensors form one block); decompression unfolds it again. ``--options``:
more keyword arguments of ``nnc.compress`` (e.g. ``{"use_dq": false, "param_opt": false}``). ``--stages``
(``bench/scale.py``) times compression and decompression apart, each with its peak RSS (reset before it
through ``/proc/self/clear_refs``), adds them to the JSON line and writes no decoded ``.npz``.
``NNC_PYTHON bench/nnc_worker.py --decode FILE.nnc`` times one decompression alone (its peak RSS too).

NNCodec's framework package imports torchvision and OpenCV when it is imported, although
compress/decompress never use them: stubs stand in for them (torchvision would pull another torch build).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import io
import json
import sys
import time
import types
from contextlib import redirect_stdout
from pathlib import Path


class _Anything:
    """Whatever torchvision attribute NNCodec touches at import time: callable, subclassable, inert."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


#: Vision packages NNCodec's framework imports at import time but compress/decompress never call.
STUBBED = ("torchvision", "cv2")


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def main(argv: list[str]) -> int:
    if argv[:1] == ["--decode"] and len(argv) == 2:  # decompression alone, timed with its peak RSS
        sys.meta_path.insert(0, _TorchvisionStub())
        from nncodec import nnc

        _peak_reset()
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            nnc.decompress(argv[1], verbose=False)
        print(json.dumps({"decode_seconds": round(time.perf_counter() - start, 2), "decode_peak_rss": _peak()}))
        return 0
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    stages = argv[0] == "--stages"
    argv = argv[1:] if stages else argv
    sys.meta_path.insert(0, _TorchvisionStub())
    import numpy as np
    from nncodec import nnc

    source, out_dir, rest = Path(argv[0]), Path(argv[1]), argv[2:]
    blocks, options = None, {}
    while rest[:1] in (["--bnf"], ["--options"]):
        value = json.loads(Path(rest[1]).read_text())
        blocks, options = (value, options) if rest[0] == "--bnf" else (blocks, value)
        rest = rest[2:]
    qps = [int(q) for q in rest]
    out_dir.mkdir(parents=True, exist_ok=True)
    with np.load(source) as archive:
        params = {name: archive[name] for name in archive.files}
    # NNCodec cannot take 0-d arrays (BatchNorm's num_batches_tracked counters, unused at inference):
    # they are handed back unchanged and not counted in its bytes
    scalars = {name: a for name, a in params.items() if a.ndim == 0}
    params = {name: a for name, a in params.items() if a.ndim > 0}
    for qp in qps:
        path = out_dir / f"qp{qp}.nnc"
        if stages:
            print(json.dumps({"qp": qp, **_stages(nnc, dict(params), path, qp, options)}), flush=True)
            continue
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):  # NNCodec prints progress; stdout carries our JSON lines
            nnc.compress(dict(params), bitstream_path=str(path), qp=qp, verbose=False, bnf=blocks is not None,
                         block_id_and_param_type=blocks, **options)
            decoded = nnc.decompress(str(path), verbose=False)
        seconds = time.perf_counter() - start
        np.savez(out_dir / f"qp{qp}.npz", **{k: np.asarray(v) for k, v in decoded.items()}, **scalars)
        print(json.dumps({"qp": qp, "bytes": path.stat().st_size, "seconds": round(seconds, 2)}), flush=True)
    return 0


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _stages(nnc, params: dict, path: Path, qp: int, options: dict) -> dict:
    """Compress, then decompress, each timed and with its own peak RSS."""
    _peak_reset()
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        nnc.compress(params, bitstream_path=str(path), qp=qp, verbose=False, **options)
    encode_seconds, encode_peak = time.perf_counter() - start, _peak()
    _peak_reset()
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        nnc.decompress(str(path), verbose=False)
    return {"bytes": path.stat().st_size, "encode_seconds": round(encode_seconds, 2), "encode_peak_rss": encode_peak,
            "decode_seconds": round(time.perf_counter() - start, 2), "decode_peak_rss": _peak()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
