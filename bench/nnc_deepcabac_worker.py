"""NNCodec side of bench/level_coder_speed.py: its DeepCABAC coder on given integer levels, timed. Runs in
NNCodec's own environment (``bench/nnc.py --setup``), never imports deepshrink.

Usage: ``NNC_PYTHON bench/nnc_deepcabac_worker.py LEVELS.npy RUNS``. Codes the int32 array (its shape kept:
NNCodec's contexts see the tensor's rows) the way NNCodec's bitstream writer does for a weight tensor
(``nnc_core/coder/baseline.py``: ``initCtxModels(cabac_unary_length_minus1 + 1, param_opt)``, then
``encodeLayer``), with NNCodec's defaults (cabac_unary_length_minus1 10, parameter optimisation on,
general profile 1, row-major scan) except dependent quantization, off: the levels are plain. Decodes
the stream again (``decodeLayer``) and checks it. Prints one JSON line: the stream's bytes and, per run,
the thread CPU seconds (``encode_s``, ``decode_s``) and wall seconds (``*_wall_s``).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from nncodec.extensions import deepCABAC
from nncodec.nnc_core.hdsp.hdsp_tool import HDSP_OPTS_OFF

UNARY_LENGTH_MINUS1 = 10  # nncodec.nnc.compress's default
PARAM_OPT = 1  # its default param_opt=True
PROFILE = 1  # nncodec.nnc.compression's general_profile_idc


def encode(levels: np.ndarray) -> bytes:
    encoder = deepCABAC.Encoder()
    encoder.initCtxModels(UNARY_LENGTH_MINUS1 + 1, PARAM_OPT)
    skipped_rows = np.zeros(levels.shape[0], dtype=np.int32)
    # dq_flag 0, scan_order 0, profile, parent_node_id_present_flag 0, row skipping off, HDSP off,
    # codebook_size 0, codebook_zero_offset 0
    encoder.encodeLayer(levels, 0, 0, PROFILE, 0, 0, skipped_rows, *HDSP_OPTS_OFF(), 0, 0)
    return bytes(encoder.finish().tobytes())


def decode(stream: bytes, shape: tuple[int, ...]) -> np.ndarray:
    decoder = deepCABAC.Decoder()
    decoder.setStream(bytearray(stream))
    decoder.initCtxModels(UNARY_LENGTH_MINUS1 + 1)
    levels = np.zeros(shape, dtype=np.int32)
    decoder.decodeLayer(levels, 0, 0, PROFILE, 0, *HDSP_OPTS_OFF(), 0, 0)
    decoder.finish()
    return levels


def main(argv: list[str]) -> int:
    levels = np.ascontiguousarray(np.load(argv[0]), dtype=np.int32)
    runs = int(argv[1])
    times: dict[str, list[float]] = {"encode_s": [], "decode_s": [], "encode_wall_s": [], "decode_wall_s": []}
    stream = b""
    for _ in range(runs):
        for what in ("encode", "decode"):
            cpu, wall = time.thread_time(), time.perf_counter()
            if what == "encode":
                stream = encode(levels)
            else:
                decoded = decode(stream, levels.shape)
            times[f"{what}_s"].append(time.thread_time() - cpu)
            times[f"{what}_wall_s"].append(time.perf_counter() - wall)
        if not np.array_equal(decoded, levels):
            print("NNCodec's decode differs from its input", file=sys.stderr)
            return 1
    print(json.dumps({"bytes": len(stream), **times}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
