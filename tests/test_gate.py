"""The one way into a file (``format.open_file``): every bound is checked there, before anything is sized
from the file, whichever reader asks (the dense loader, the sparse runtime, ``inspect``, ``eval``)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

import deepshrink
from deepshrink import format as fmt
from deepshrink.cli import main
from deepshrink.codecs.deep_compression import encode_quantized
from deepshrink.codecs.raw import RawTensor
from deepshrink.compress import compress_model
from deepshrink.errors import ConfigError, HeaderTooLarge, InvalidHeader, TensorInfoMismatch
from deepshrink.models import build_model
from deepshrink.quantize import QuantizeConfig, quantize_model

from format_attacks import attacks


def _file_with_an_empty_weight(tmp_path, rows: int):
    """A valid file holding a quantized weight of shape [4, 0], its header then edited to [rows, 0]."""
    empty = encode_quantized(np.zeros((4, 0), np.int64), np.array([0.5], np.float32), 1, 5)
    header, payload = attacks.split(b"".join(fmt.serialize({"w": empty, "b": RawTensor(np.ones(3, "<f4"))})))
    header["tensors"]["w"]["shape"] = [rows, 0]
    path = tmp_path / "rows.dsz"
    path.write_bytes(attacks.join(header, payload))
    return path


@pytest.mark.parametrize("rows", [10**9, 2**31])
def test_s1_an_empty_weight_with_a_billion_rows_is_refused_before_anything_is_sized(tmp_path, rows):
    path = _file_with_an_empty_weight(tmp_path, rows)
    for load in (lambda: deepshrink.load(path), lambda: deepshrink.load(path, runtime="sparse"),
                 lambda: deepshrink.load(path, runtime="sparse", model=torch.nn.Linear(1, 4)), lambda: fmt.read_file(path)):
        with pytest.raises(TensorInfoMismatch, match="elements and rows"):
            load()
    # a handful of rows is a valid (if odd) file: the bound counts rows, it does not refuse empty tensors
    header, tensors = fmt.read_file(_file_with_an_empty_weight(tmp_path, 7))
    assert tensors["w"].shape == (7, 0)


def _mlp_file(tmp_path):
    torch.manual_seed(0)
    model = build_model({"arch": "mlp"})
    quantize_model(model, QuantizeConfig(bits=3))
    path = tmp_path / "m.dsz"
    compress_model(model, path, model_spec={"arch": "mlp"})
    return path


def test_s2_both_runtimes_honour_max_memory(tmp_path):
    path = _mlp_file(tmp_path)
    need = fmt.decode_memory(sum(int(np.prod(t.shape)) + t.shape[0] for t in fmt.open_file(path).encoded.values()
                                 if len(t.shape) >= 2), 0)
    for runtime in deepshrink.RUNTIMES:
        with pytest.raises(TensorInfoMismatch, match="more than max_memory=1,000"):
            deepshrink.load(path, runtime=runtime, max_memory=1000)
        assert deepshrink.load(path, runtime=runtime, max_memory=10 * need) is not None


BAD_RECORDS = [
    {"name": "digits", "mean": None}, {"name": "digits", "std": "x"}, {"name": "digits", "image_shape": 1.5},
    {"name": "digits", "image_shape": [2, 8, 8]}, {"name": "digits", "image_shape": [1, 0, 8]},
    {"name": "digits", "num_classes": -1}, {"name": "digits", "num_classes": 10**12}, {"name": 5},
    {"name": ""}, {"name": "digits", "validation": "10%"}, {"name": "digits", "validation": -3},
    {"name": "digits", "augment": "mirror"}, {"name": "digits", "std": [0.0]}, {"name": "digits", "mean": [1, 2]},
    {"name": "digits", "mean": [0.5], "image_shape": [3, 8, 8]}, {"name": "digits", "root": "/etc"},
    {"name": "digits", "train_subset": True}, {"name": "digits", "unknown": 1}, "digits", [1, 2],
]


@pytest.mark.parametrize("record", BAD_RECORDS, ids=[json.dumps(r)[:40] for r in BAD_RECORDS])
def test_c1_a_malformed_dataset_record_is_one_error_line_everywhere(tmp_path, capsys, record):
    path = _mlp_file(tmp_path)
    header, payload = attacks.split(path.read_bytes())
    header["meta"]["dataset"] = record
    path.write_bytes(attacks.join(header, payload))
    with pytest.raises(InvalidHeader, match="meta 'dataset'"):
        fmt.read_header(path)
    for command in (["eval", str(path)], ["inspect", str(path)], ["summary", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, (command, err)
    with pytest.raises(ConfigError, match="meta 'dataset'"):  # and the writer never writes one
        fmt.serialize({}, None, {"dataset": record})


def test_d1_a_header_of_a_quarter_million_entries_is_refused_unread(tmp_path):
    entry = '"%x":{"codec":"constant","dtype":"int8","shape":[],"value":0}'
    tensors = ",".join(entry % i for i in range(250_000))  # 15 MB of JSON, under the header cap
    text = '{"format":"deepshrink","meta":{},"model":null,"payload_crc32":0,"tensors":{%s},"version":4}' % tensors
    deflate = zlib.compressobj(9, zdict=fmt.HEADER_DICTIONARY)
    raw = deflate.compress(text.encode()) + deflate.flush()
    path = tmp_path / "d1.dsz"
    path.write_bytes(struct.pack("<8sHHQ", fmt.MAGIC, 4, 1, len(raw)) + raw)
    with pytest.raises(HeaderTooLarge, match=f"more than the format's {fmt.MAX_TENSORS}"):
        fmt.read_header(path)
    with pytest.raises(ConfigError, match="exceed the format's limit"):
        fmt.serialize({f"t{i}": RawTensor(np.zeros(1, "<f4")) for i in range(fmt.MAX_TENSORS + 1)})


def test_eval_reads_the_file_once(tmp_path, monkeypatch, capsys):
    path = _mlp_file(tmp_path)
    header, payload = attacks.split(path.read_bytes())
    header["meta"]["dataset"] = {"name": "digits"}
    path.write_bytes(attacks.join(header, payload))
    opened = []
    real_open = fmt.open_file
    monkeypatch.setattr(fmt, "open_file", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert main(["eval", str(path)]) == 0
    assert len(opened) == 1 and "test accuracy" in capsys.readouterr().out
