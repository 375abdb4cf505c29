"""Context-adaptive binary arithmetic coding of one quantized tensor's signed levels (DeepCABAC-like).

A tensor is a 1-D stream of integer levels in scan order (C order of the weight), zeros included,
with ``|level| <= max_abs``. ``row_length`` (the elements of one output row/filter) gives the
context geometry: column j of row r is level ``r * row_length + j``. Nothing is stored but the
bits and a few constants (``params``); the bit probabilities adapt as the stream is coded, so a long
run of zeros costs a small fraction of a bit per level.

Context state, all from levels already coded: ``window`` = non-zeros among the previous 8 levels of
the row; ``left`` = the level just before in the row (0 at its start); ``row_last`` = the row's last
non-zero level so far (0 if none); ``column`` = column j's last non-zero level in earlier rows (0 if
none); ``seen`` = column j's non-zeros in earlier rows. Binarisation of a level v (M = max_abs,
T = min(num_gt, M - 1)); nothing at all is coded when M == 0. Context model
``sig24-sign27-gt12k-eg0-warmup`` (written since format version 3; ``left`` is what it adds, because
neighbouring weights of a layer that sees neighbouring pixels are alike: 7-8% fewer bytes on
LeNet-300-100, about 1% on convolutions):

1. ``sig`` = v != 0, context ``8 * col_class + 4 * (left != 0) + min(window, 3)`` with col_class 0 if
   seen == 0, 1 if 8 * seen < r (row r, so a column that was non-zero in under 1/8 of the earlier
   rows), else 2 (24 contexts).
2. ``sign`` = v < 0, context ``24 + 9 * sign_class(left) + 3 * sign_class(column) + sign_class(row_last)``,
   sign_class 0 for zero, 1 for negative, 2 for positive (27 contexts).
3. ``gt_k`` = |v| > k for k = 1..T, stopping after the first 0, context
   ``51 + 12 * (k - 1) + 6 * (v < 0) + 2 * ((|row_last| > k) + (|column| > k)) + (|left| > k)``.
4. If |v| > T: when T == M - 1 the unary code was truncated and |v| == M; otherwise the remainder
   |v| - T - 1 follows as order-0 Exp-Golomb in bypass bins (n ones, a zero, then the n bits of
   remainder + 1 below its leading one, most significant first).

Model ``sig24-sign27-gt24k-eg0-warmup-dq8`` codes the levels j of dependent (trellis-coded)
quantization: an 8-state machine (NNC's) starts in state 0 and moves on the parity of each coded k;
state s quantizes with quantizer q = s & 1, which makes even j (q = 0) or odd j and 0 (q = 1), and
the stream codes k with j = 2k - sign(k) q by the rules above applied to k, the ``gt_k`` context
becoming ``51 + 24 (k - 1) + 12 q + ...`` (the rest as above). ``encode`` refuses levels off the machine.

The earlier model ``sig12-sign9-gt6k-eg0-warmup`` (format version 2) is the same without ``left``:
contexts ``4 * col_class + min(window, 3)``, ``12 + 3 * sign_class(column) + sign_class(row_last)``
and ``21 + 6 * (k - 1) + 3 * (v < 0) + (|row_last| > k) + (|column| > k)``; both decode.

Bins go through a range coder with 32-bit range and carry propagation (the LZMA design). Each
context holds two 16-bit estimates of P(bin = 1) and a count n of its bins (saturating at 255);
each bin moves them towards 0 or 65536 by the difference shifted right by min(r, 4) and min(r, 7),
r = 1 + floor(log2(n + 1)) (a running mean while the context is young, then fixed rates), and
their sum shifted right by 2 is the 15-bit probability; a bypass bin is a bin with the fixed probability 2**14 / 2**15 and no
adaptation. docs/format.md specifies every step; the constants (``PROB_BITS``, ``SHIFTS`` and
``INIT_PROB`` here as well) are written into ``params`` and checked on decode, so a file never depends on
a library default. The numba kernels that code the bins are ``level_kernels``.
"""

from __future__ import annotations

import numpy as np

from deepshrink.coding import as_payload, check_count, int_array
from deepshrink.coding.level_kernels import (BAD_LEVEL, BAD_START, INIT_PROB, PROB_BITS, SHIFTS,
                                             decode_payload, dependent_to_coded, encode_payload)
from deepshrink.errors import CodecError

# --- the bitstream's constants (all written into params and checked on decode) -----------------
# PROB_BITS, SHIFTS and INIT_PROB come from level_kernels, which implements them
#: levels of a dependent (trellis-coded) quantizer: model 1's rules on the coded k, plus the quantizer in use
DEPENDENT_CONTEXT_MODEL = "sig24-sign27-gt24k-eg0-warmup-dq8"
#: the context rules of this docstring / docs/format.md, by name: 0 = version 2's, 1 = with ``left``, 2 = dq
CONTEXT_MODELS = {"sig12-sign9-gt6k-eg0-warmup": 0, "sig24-sign27-gt12k-eg0-warmup": 1,
                  DEPENDENT_CONTEXT_MODEL: 2}
CONTEXT_MODEL = "sig24-sign27-gt12k-eg0-warmup"  # what the encoder writes
LEGACY_CONTEXT_MODEL = "sig12-sign9-gt6k-eg0-warmup"  # the only one format version 2 readers know
DEFAULT_NUM_GT = 32  # unary "greater than k" flags before the Exp-Golomb remainder
MAX_NUM_GT = 64  # bounds the bins per level a hostile header can ask for
MAX_ABS = 1 << 16  # the format's largest alphabet is 2**16 centroids
MAX_ROW_LENGTH = 1 << 31
_PARAM_KEYS = {"row_length", "max_abs", "num_gt", "prob_bits", "shifts", "init_prob", "context_model"}


# --- API ----------------------------------------------------------------------------------------


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CodecError(f"cabac {name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise CodecError(f"cabac {name} must be in {low}..{high}, got {value}")
    return int(value)


def make_params(row_length: int, max_abs: int, num_gt: int = DEFAULT_NUM_GT,
                context_model: str = CONTEXT_MODEL) -> dict:
    """The params dict for a stream: geometry, alphabet and every bitstream constant."""
    params = {
        "row_length": row_length, "max_abs": max_abs, "num_gt": num_gt, "prob_bits": PROB_BITS,
        "shifts": list(SHIFTS), "init_prob": INIT_PROB, "context_model": context_model,
    }
    validate_params(params)
    return params


def validate_params(params: dict) -> tuple[int, int, int, int]:
    """(row_length, max_abs, num_gt, context model number) after checking ``params`` (CodecError names the bad key)."""
    if not isinstance(params, dict):
        raise CodecError(f"cabac params must be a dict, got {type(params).__name__}")
    if set(params) != _PARAM_KEYS:
        raise CodecError(f"cabac params must have keys {sorted(_PARAM_KEYS)}, got {sorted(map(str, params))}")
    model = params["context_model"]
    if not isinstance(model, str) or model not in CONTEXT_MODELS:
        raise CodecError(f"cabac param context_model must be one of {sorted(CONTEXT_MODELS)}, got {model!r}")
    fixed = {"prob_bits": PROB_BITS, "shifts": list(SHIFTS), "init_prob": INIT_PROB}
    for key, expected in fixed.items():
        value = params[key]
        if type(value) is not type(expected) or value != expected or (
            isinstance(value, list) and any(type(x) is not int for x in value)
        ):
            raise CodecError(f"cabac param {key} must be {expected!r} (the only supported value), got {value!r}")
    row_length = _check_int(params["row_length"], "row_length", 1, MAX_ROW_LENGTH)
    # dependent levels j = 2k - sign(k) * quantizer stay within MAX_ABS: their coded k within half of it
    max_abs = _check_int(params["max_abs"], "max_abs", 0, MAX_ABS // 2 if model == DEPENDENT_CONTEXT_MODEL else MAX_ABS)
    num_gt = _check_int(params["num_gt"], "num_gt", 0, MAX_NUM_GT)
    return row_length, max_abs, num_gt, CONTEXT_MODELS[model]


def as_levels(levels) -> np.ndarray:
    """1-D int32 copy/view of ``levels`` after checking rank, dtype and |level| <= MAX_ABS (CodecError)."""
    return int_array(levels, "levels", -MAX_ABS, MAX_ABS, np.int32)


def encode(levels, row_length: int, num_gt: int = DEFAULT_NUM_GT,
           context_model: str = CONTEXT_MODEL) -> tuple[bytes, dict]:
    """Code 1-D signed ``levels`` (scan order) whose rows hold ``row_length`` levels; returns (payload, params).
    ``context_model=LEGACY_CONTEXT_MODEL`` writes what format version 2 readers decode.

    >>> payload, params = encode(np.array([0, 0, 3, -1, 0, 0]), row_length=3)
    >>> decode(payload, params, 6).tolist()
    [0, 0, 3, -1, 0, 0]

    Raises:
        CodecError: levels not 1-D integers within MAX_ABS, or a bad row_length/num_gt.
    """
    array = as_levels(levels)
    if context_model == DEPENDENT_CONTEXT_MODEL:
        array = coded_levels(array)
    max_abs = max(-int(array.min()), int(array.max())) if array.size else 0
    params = make_params(row_length, max_abs, num_gt, context_model)
    payload = encode_payload(array, params["row_length"], max_abs, params["num_gt"], CONTEXT_MODELS[context_model])
    return payload.tobytes(), params


def decode(payload, params: dict, count: int) -> np.ndarray:
    """Decode ``count`` levels (int32) from ``payload``; ``count`` comes from the caller (the file's header).

    Raises:
        CodecError: bad params or count, or a payload that is not exactly the coding of ``count``
            levels within ``max_abs`` (a bad start, an Exp-Golomb prefix or level out of range,
            bytes left over, a trailing zero byte the encoder would have stripped).
    """
    row_length, max_abs, num_gt, model = validate_params(params)
    count = check_count(count)
    data = np.frombuffer(as_payload(payload), dtype=np.uint8)
    if data.size and data[-1] == 0:
        raise CodecError("cabac payload ends with a zero byte (the encoder strips them)")
    if count == 0 or max_abs == 0:
        if data.size:
            raise CodecError(f"cabac payload holds {data.size} bytes but codes no bins (count {count}, max_abs {max_abs})")
        return np.zeros(count, dtype=np.int32)
    out = np.zeros(count, dtype=np.int32)  # the kernel writes the non-zero levels only
    status, read = decode_payload(data, count, row_length, max_abs, num_gt, model, out)
    if status == BAD_START:
        raise CodecError("cabac payload starts with a value outside the coder's range")
    if status == BAD_LEVEL:
        raise CodecError(f"cabac payload codes a level beyond max_abs={max_abs} (at byte {read})")
    if read < data.size:
        raise CodecError(f"cabac payload has {data.size - read} trailing bytes after {count} levels")
    return out


def coded_levels(levels) -> np.ndarray:
    """The levels k that ``DEPENDENT_CONTEXT_MODEL`` codes for reconstruction levels j (int32, 1-D).

    Dependent quantization (trellis-coded, as in NNC and VVC) alternates two quantizers along the scan:
    quantizer 0 makes the even multiples of the step (j = 2k), quantizer 1 the odd ones and zero
    (j = 2k - sign(k)); which one quantizes a weight is the state of an 8-state machine driven by the
    parity of the previous k. Only ``quantize.dependent_1d`` (the trellis) makes such sequences.

    Raises:
        CodecError: a level that the quantizer of its state cannot make (levels not from the trellis).
    """
    array = as_levels(levels)
    coded = np.empty_like(array)
    bad = dependent_to_coded(array, coded)
    if bad >= 0:
        raise CodecError(f"level {int(array[bad])} at position {bad} is not on the dependent quantizer of "
                         "its state: these levels were not made by dependent quantization")
    return coded


def is_dependent(levels) -> bool:
    """Whether ``levels`` (1-D integers) have a non-zero and follow dependent quantization's state machine."""
    array = as_levels(levels)
    return bool(array.size and array.any() and dependent_to_coded(array, np.empty_like(array)) < 0)
