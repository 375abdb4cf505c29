import hashlib
import json
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepshrink.codecs.cabac import levels_to_values
from deepshrink.coding import level_coder, level_kernels
from deepshrink.errors import CodecError


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile the numba kernels once so per-example deadlines time the coder, not the compiler."""
    payload, params = level_coder.encode(np.array([0, 2, -40, 1]), 2, num_gt=2)
    level_coder.decode(payload, params, 4)


def round_trip(levels, row_length, num_gt=level_coder.DEFAULT_NUM_GT):
    levels = np.asarray(levels)
    payload, params = level_coder.encode(levels, row_length, num_gt)
    params = json.loads(json.dumps(params))  # what a file header gives back
    decoded = level_coder.decode(payload, params, levels.size)
    assert decoded.dtype == np.int32
    assert np.array_equal(decoded, levels)
    return payload, params


def sparse_levels(rng, n, max_abs, density):
    levels = rng.integers(-max_abs, max_abs + 1, n) if max_abs else np.zeros(n, dtype=np.int64)
    return np.where(rng.random(n) < density, levels, 0)


DQ_NEXT = [[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]]  # NNC's 8-state machine


def dependent(coded) -> np.ndarray:
    """Reconstruction levels j = 2k - sign(k) * (state & 1) of coded levels k, written out independently."""
    state, out = 0, []
    for k in np.asarray(coded).tolist():
        out.append(0 if k == 0 else 2 * k - (1 if k > 0 else -1) * (state & 1))
        state = DQ_NEXT[state][abs(k) & 1]
    return np.array(out, dtype=np.int64)


def levels_for(context_model, levels):
    """``levels`` as the context model takes them: the dependent model codes them as k."""
    return dependent(levels) if context_model == level_coder.DEPENDENT_CONTEXT_MODEL else np.asarray(levels)


# --- round trips --------------------------------------------------------------------------------


def test_empty_and_all_zero_streams_are_empty_payloads():
    assert round_trip(np.zeros(0, dtype=np.int8), 1)[0] == b""
    payload, params = round_trip(np.zeros(50_000, dtype=np.int32), 100)
    assert payload == b"" and params["max_abs"] == 0


@pytest.mark.parametrize("row_length", [1, 7, 300, 10_000])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
def test_sparse_and_dense_streams_in_any_geometry(row_length, density):
    rng = np.random.default_rng(row_length)
    round_trip(sparse_levels(rng, 10_000, 31, density), row_length)


def test_every_level_count_up_to_256():
    # K levels on one side (all-positive codebook) or split around zero: max_abs from 0 to 256
    rng = np.random.default_rng(1)
    for max_abs in range(257):
        levels = sparse_levels(rng, 400, max_abs, 0.5)
        levels[rng.integers(0, 400)] = max_abs  # the extreme level is always present
        round_trip(levels, 20, num_gt=level_coder.DEFAULT_NUM_GT)
        round_trip(-levels, 400, num_gt=max_abs % 5)  # few flags: the Exp-Golomb remainder does the work


@pytest.mark.parametrize("num_gt", [0, 1, 2, 16, level_coder.MAX_NUM_GT])
def test_flag_counts_and_extreme_levels(num_gt):
    rng = np.random.default_rng(num_gt)
    levels = rng.integers(-level_coder.MAX_ABS, level_coder.MAX_ABS + 1, 3000)
    levels[:4] = [level_coder.MAX_ABS, -level_coder.MAX_ABS, 1, -1]
    round_trip(levels, 50, num_gt)


def test_long_runs_of_zeros_cost_a_small_fraction_of_a_bit_each():
    levels = np.zeros(1_000_000, dtype=np.int16)
    levels[[0, 500_000, 999_999]] = [3, -2, 1]
    payload, _ = round_trip(levels, 1000)
    assert 8 * len(payload) < 0.005 * levels.size


def test_input_dtypes_and_levels_outside_the_limit():
    round_trip(np.array([0, 1, -1, 127, -128], dtype=np.int8), 2)
    round_trip(np.array([0, 1, 65535], dtype=np.uint16), 2)
    with pytest.raises(CodecError, match="1-D"):
        level_coder.encode(np.zeros((2, 2), dtype=np.int32), 2)
    with pytest.raises(CodecError, match="integer dtype"):
        level_coder.encode(np.array([0.0, 1.0]), 2)
    with pytest.raises(CodecError, match=r"\[-65536, 65536\]"):
        level_coder.encode(np.array([0, level_coder.MAX_ABS + 1]), 2)
    for row_length in (0, -1, 2.0, True):
        with pytest.raises(CodecError, match="row_length"):
            level_coder.encode(np.array([0, 1]), row_length)
    with pytest.raises(CodecError, match="num_gt"):
        level_coder.encode(np.array([0, 1]), 2, num_gt=level_coder.MAX_NUM_GT + 1)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 3000),
    row_length=st.one_of(st.integers(1, 40), st.integers(1, 5000)),
    max_abs=st.sampled_from([0, 1, 2, 3, 7, 31, 127, 256, 4000]),
    density=st.floats(0.0, 1.0),
    num_gt=st.integers(0, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(n, row_length, max_abs, density, num_gt, seed):
    round_trip(sparse_levels(np.random.default_rng(seed), n, max_abs, density), row_length, num_gt)


@pytest.mark.parametrize("context_model", level_coder.CONTEXT_MODELS)
def test_bitstream_is_pinned(context_model):
    # golden bytes: a change here changes the format (docs/format.md, cabac); the legacy model's bytes
    # are the ones format version 2 files hold. The dependent model's levels repeat, so that both
    # quantizers' contexts see bins (with fresh contexts alone every model writes the same bytes)
    coded, golden = GOLDEN[context_model]
    levels = levels_for(context_model, coded)
    payload, params = level_coder.encode(levels, 4, num_gt=2, context_model=context_model)
    assert payload.hex() == golden
    assert params == {"row_length": 4, "max_abs": 5, "num_gt": 2, "prob_bits": 15, "shifts": [4, 7],
                      "init_prob": 32768, "context_model": context_model}
    assert level_coder.decode(payload, params, len(levels)).tolist() == levels.tolist()


_PINNED = [0, 0, 3, -1, 0, 0, 0, 2, 0, 0, 0, -5]
GOLDEN = {"sig12-sign9-gt6k-eg0-warmup": (_PINNED, "aa620f40"), "sig24-sign27-gt12k-eg0-warmup": (_PINNED, "aa620f50"),
          "sig24-sign27-gt24k-eg0-warmup-dq8": (_PINNED * 4, "aa620f57088e25a5712b80")}


def pinned_levels(seed, n, max_abs, density):
    """Seeded levels: mostly small magnitudes, 2% anywhere up to max_abs (long Exp-Golomb remainders)."""
    rng = np.random.default_rng(seed)
    magnitude = np.minimum(rng.geometric(0.35, n), max_abs)
    magnitude = np.where(rng.random(n) < 0.02, rng.integers(1, max_abs + 1, n), magnitude)
    levels = np.where(rng.random(n) < 0.5, -magnitude, magnitude)
    return np.where(rng.random(n) < density, levels, 0)


# (seed, count, row_length, max_abs, density, num_gt): a sparse conv filter bank, a sparse fc slice,
# few flags and large levels, no flags at all (every magnitude an Exp-Golomb remainder)
PINNED_CASES = [(0, 4608, 288, 7, 0.08, 32), (1, 20_000, 784, 127, 0.05, 32), (2, 6000, 50, 4000, 0.6, 2),
                (3, 3000, 7, level_coder.MAX_ABS // 2, 0.9, 0)]
PINNED_SHA256 = {
    "sig12-sign9-gt6k-eg0-warmup": [
        "569ddc5e1766cc136e4577765e3f50ae5e4db482e9621a38a834ba72f89d7da7",
        "c8b898dc494b198b41ac3825f8c1f12e887c2d5e4d8284ed01b5ac6b516fda9c",
        "e08191f66c1b72f042769a7090c06b678a2c6b749343a81d91225d40c727c411",
        "b9d51b1ad3066f1d71be2b7cda3816d622300778d048d769a498e1e76eda908d",
    ],
    "sig24-sign27-gt12k-eg0-warmup": [
        "10130f486455d079eb37537e9b9db326647557489159329a47d82126d41b9f32",
        "acfcbb32543695669bb8c5a540c1a89168bdf204419ac76ec157de64bc0b885c",
        "52dd7f6ad49fe891a3f7dc56339272146318664a3d39275d75a1217c7f344163",
        "518a13c0227ca4ec3cd0562d64c474a1cab2464e99237588cb2fa8b87ae51499",
    ],
    "sig24-sign27-gt24k-eg0-warmup-dq8": [
        "48499085e67dc8408a29818baffd56415be6d309a3948a6a56ce91e1bbd769aa",
        "e61e1fe8318616ce2b73b35ae6e0fab25d7d734eeaa0159e18efa640dfd90af2",
        "f5f2100e0f043c7c7963d8a15210ce21df64ccf456724cd206cceb10e153dfe7",
        "518a13c0227ca4ec3cd0562d64c474a1cab2464e99237588cb2fa8b87ae51499",
    ],
}


@pytest.mark.parametrize("context_model", level_coder.CONTEXT_MODELS)
def test_larger_streams_are_pinned(context_model):
    # sha256 of the bytes the coder wrote before it was optimised (2026, issue 26): any change of the
    # bitstream, in any context model, fails here
    for (seed, count, row_length, max_abs, density, num_gt), digest in zip(PINNED_CASES, PINNED_SHA256[context_model]):
        levels = levels_for(context_model, pinned_levels(seed, count, max_abs, density))
        payload, params = level_coder.encode(levels, row_length, num_gt, context_model)
        assert hashlib.sha256(payload).hexdigest() == digest, (seed, context_model)
        assert np.array_equal(level_coder.decode(payload, params, count), levels)


def test_the_encoder_writes_the_context_model_with_left_neighbours():
    assert level_coder.encode(np.array([1, 0]), 2)[1]["context_model"] == level_coder.CONTEXT_MODEL == "sig24-sign27-gt12k-eg0-warmup"


def reference_decode(payload: bytes, params: dict, count: int) -> list[int]:
    """docs/format.md's cabac decoder written out in plain Python, independent of the numba kernels."""
    row, max_abs, num_gt = params["row_length"], params["max_abs"], params["num_gt"]
    legacy = params["context_model"] == "sig12-sign9-gt6k-eg0-warmup"  # without the ``left`` level
    dq = params["context_model"] == "sig24-sign27-gt24k-eg0-warmup-dq8"  # k coded; the quantizer in gt contexts
    data = list(payload)
    byte = lambda i: data[i] if i < len(data) else 0  # noqa: E731
    rng, code, pos = 0xFFFFFFFF, int.from_bytes(bytes(byte(i) for i in range(4)), "big"), 4
    est = [[32768, 32768, 0] for _ in range((21 + 6 * num_gt) if legacy else (51 + (24 if dq else 12) * num_gt))]

    def bin_(p):
        nonlocal rng, code, pos
        bound = (rng >> 15) * p
        bit = int(code < bound)
        rng, code = (bound, code) if bit else (rng - bound, code - bound)
        while rng < 1 << 24:
            rng, code, pos = rng << 8, (code << 8) | byte(pos), pos + 1
        return bit

    def ctx_bin(c):
        bit = bin_((est[c][0] + est[c][1]) >> 2)
        rate = 1 + int(math.log2(est[c][2] + 1))
        for j, cap in enumerate((4, 7)):
            shift = min(rate, cap)
            est[c][j] += (65536 - est[c][j]) >> shift if bit else -(est[c][j] >> shift)
        est[c][2] = min(est[c][2] + 1, 255)
        return bit

    out = []
    last = min(num_gt, max_abs - 1)
    col_last, col_seen = {}, {}  # column -> its last non-zero level, its non-zeros so far
    cls = lambda v: 0 if v == 0 else 1 if v < 0 else 2  # noqa: E731
    state = 0
    for i in range(count):
        if dq and i:
            state = DQ_NEXT[state][abs(out[i - 1]) & 1]
        col = i % row
        row_levels = out[i - col : i]
        row_last = next((v for v in reversed(row_levels) if v), 0)
        window = sum(v != 0 for v in row_levels[-8:])
        column, seen = col_last.get(col, 0), col_seen.get(col, 0)
        left = row_levels[-1] if row_levels else 0
        density = 0 if seen == 0 else 1 if 8 * seen < i // row else 2
        sig_ctx = 4 * density + min(window, 3) if legacy else 8 * density + 4 * (left != 0) + min(window, 3)
        if max_abs == 0 or not ctx_bin(sig_ctx):
            out.append(0)
            continue
        neg = ctx_bin(12 + 3 * cls(column) + cls(row_last) if legacy else 24 + 9 * cls(left) + 3 * cls(column) + cls(row_last))
        mag = 1
        for k in range(1, last + 1):
            near = (abs(row_last) > k) + (abs(column) > k)
            if legacy:
                gt_ctx = 21 + 6 * (k - 1) + 3 * neg + near
            elif dq:
                gt_ctx = 51 + 24 * (k - 1) + 12 * (state & 1) + 6 * neg + 2 * near + (abs(left) > k)
            else:
                gt_ctx = 51 + 12 * (k - 1) + 6 * neg + 2 * near + (abs(left) > k)
            if not ctx_bin(gt_ctx):
                break
            mag += 1
        if mag > last and last < max_abs - 1:
            width = 0
            while bin_(1 << 14):
                width += 1
            value = 1
            for _ in range(width):
                value = value << 1 | bin_(1 << 14)
            mag = last + value
        col_last[col] = -mag if neg else mag
        col_seen[col] = seen + 1
        out.append(-mag if neg else mag)
    return dependent(out).tolist() if dq else out


@pytest.mark.parametrize("context_model", level_coder.CONTEXT_MODELS)
@pytest.mark.parametrize("seed", range(6))
def test_numba_coder_agrees_with_the_plain_python_reference(seed, context_model):
    rng = np.random.default_rng(seed)
    levels = levels_for(context_model, sparse_levels(rng, 2000, [1, 5, 40, 300, 3, 64][seed],
                                                     [0.05, 0.5, 1.0, 0.3, 0.9, 0.2][seed]))
    payload, params = level_coder.encode(levels, [1, 7, 40, 2000, 33, 100][seed], num_gt=[0, 2, 16, 5, 64, 8][seed],
                                   context_model=context_model)
    assert reference_decode(payload, params, levels.size) == levels.tolist()


@pytest.mark.parametrize("context_model", level_coder.CONTEXT_MODELS)
def test_streams_longer_than_the_encoders_chunks_agree_with_the_reference(context_model):
    # the encoder codes _CHUNK levels at a time (a chunk ends at a row's end with rows of 64, inside one
    # with rows of 100); the dense 4000-level stream outgrows the output buffer's first allocation
    rng = np.random.default_rng(9)
    count = 2 * level_kernels._CHUNK + 77
    for row_length, max_abs, density, num_gt in ((64, 7, 0.1, 32), (100, 40, 0.3, 2), (1, 4000, 1.0, 5)):
        levels = levels_for(context_model, sparse_levels(rng, count, max_abs, density))
        payload, params = level_coder.encode(levels, row_length, num_gt, context_model)
        assert reference_decode(payload, params, count) == levels.tolist()


def test_the_kernels_release_the_gil():
    # a thread pool can code tensors in parallel only if the hot loops run without the GIL
    for kernel in (level_kernels.encode_payload, level_kernels._encode_chunk, level_kernels.decode_payload):
        assert kernel.targetoptions.get("nogil") is True


def test_levels_to_values_is_one_lookup_that_refuses_levels_outside_the_codebook():
    codebook = np.array([-2.0, -0.25, 0.5, 3.0], np.float16)  # levels -2, -1, 1, 2
    levels = np.array([[0, -2, -1], [1, 2, 0]], np.int32)
    values = levels_to_values(levels, codebook, 2)
    assert values.dtype == np.float32 and values.tolist() == [[0.0, -2.0, -0.25], [0.5, 3.0, 0.0]]
    for outside in (3, -3):
        with pytest.raises(ValueError, match="outside the codebook"):
            levels_to_values(np.array([0, outside]), codebook, 2)


# --- coded size ---------------------------------------------------------------------------------


def test_contexts_beat_the_memoryless_entropy_on_structured_weights():
    # rows with their own scale and dead input columns: what pruned fc layers look like
    rng = np.random.default_rng(5)
    rows, cols = 300, 784
    alive_cols = rng.random(cols) < 0.6
    scale = rng.uniform(0.3, 3.0, (rows, 1))
    weights = rng.laplace(size=(rows, cols)) * scale * alive_cols
    levels = np.where(np.abs(weights) > 2.0, np.clip(np.round(weights), -31, 31), 0).astype(np.int32).reshape(-1)
    payload, _ = round_trip(levels, cols)
    _, counts = np.unique(levels, return_counts=True)
    memoryless = -(counts * np.log2(counts / levels.size)).sum()
    assert 8 * len(payload) < 0.9 * memoryless
    # the same levels without their geometry (one long row) lose the column contexts
    assert len(payload) < 0.95 * len(level_coder.encode(levels, levels.size)[0])


def test_the_left_neighbour_pays_where_neighbouring_weights_are_alike():
    # smooth rows (a layer over neighbouring pixels): non-zeros, signs and sizes come in runs
    rng = np.random.default_rng(6)
    rows, cols = 200, 784
    smooth = np.cumsum(rng.normal(size=(rows, cols)), axis=1) / 6
    levels = np.where(np.abs(smooth) > 1.5, np.clip(np.round(smooth), -15, 15), 0).astype(np.int32).reshape(-1)
    new = len(round_trip(levels, cols)[0])
    legacy, params = level_coder.encode(levels, cols, context_model=level_coder.LEGACY_CONTEXT_MODEL)
    assert np.array_equal(level_coder.decode(legacy, params, levels.size), levels)
    assert new < 0.9 * len(legacy)


# --- dependent quantization's context model ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 2000), row_length=st.integers(1, 300), max_abs=st.sampled_from([0, 1, 2, 5, 40, 4000]),
       density=st.floats(0.0, 1.0), num_gt=st.integers(0, 20), seed=st.integers(0, 2**32 - 1))
def test_dependent_levels_round_trip(n, row_length, max_abs, density, num_gt, seed):
    coded = sparse_levels(np.random.default_rng(seed), n, max_abs, density)
    levels = dependent(coded)
    payload, params = level_coder.encode(levels, row_length, num_gt, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)
    assert params["max_abs"] == (int(np.abs(coded).max()) if n else 0)  # the coded k, about half of |j|
    assert np.array_equal(level_coder.decode(payload, json.loads(json.dumps(params)), n), levels)
    assert np.array_equal(level_coder.coded_levels(levels), coded)
    assert level_coder.is_dependent(levels) == bool(np.any(coded))


def test_levels_off_the_state_machine_are_refused_by_the_dependent_model():
    # state 0 quantizes with quantizer 0 (even levels only); after k = 1 the machine is in state 2 (also
    # quantizer 0), after k = 1 twice in state 3 (odd levels and zero)
    assert level_coder.coded_levels([0, 2, 2, 1, 0]).tolist() == [0, 1, 1, 1, 0]
    for bad, position in (([0, 1], 1), ([2, 2, 2], 2), ([2, 2, 0, 0, 4], 4)):
        assert not level_coder.is_dependent(bad)
        with pytest.raises(CodecError, match=f"at position {position} is not on the dependent quantizer"):
            level_coder.encode(np.array(bad), 2, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)
    assert not level_coder.is_dependent(np.zeros(5, dtype=np.int32))  # nothing to gain: the plain model codes it
    with pytest.raises(CodecError, match="max_abs"):  # j = 2k - ... must stay within MAX_ABS
        level_coder.validate_params(level_coder.make_params(4, 1, 2, level_coder.DEPENDENT_CONTEXT_MODEL) | {"max_abs": level_coder.MAX_ABS})


def test_the_dependent_model_codes_trellis_levels_smaller_than_the_plain_models():
    # the same j sequence: coding k (about |j| / 2) with the quantizer in the magnitude contexts pays
    rng = np.random.default_rng(8)
    coded = np.where(rng.random(40_000) < 0.3, np.round(rng.laplace(scale=2.0, size=40_000)), 0).astype(np.int64)
    levels = dependent(coded)
    dq = len(level_coder.encode(levels, 400, context_model=level_coder.DEPENDENT_CONTEXT_MODEL)[0])
    assert dq < 0.95 * len(level_coder.encode(levels, 400)[0])


# --- hostile input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream():
    levels = sparse_levels(np.random.default_rng(7), 5000, 40, 0.2)
    payload, params = level_coder.encode(levels, 50)
    return payload, params, levels


def test_damaged_payloads_are_detected(stream):
    payload, params, levels = stream
    # bytes past what decoding reads are rejected (a byte within the zeros the encoder stripped
    # changes the levels instead: the file's CRC catches that)
    with pytest.raises(CodecError, match="trailing"):
        level_coder.decode(payload + b"\x01" * 64, params, levels.size)
    with pytest.raises(CodecError, match="zero byte"):
        level_coder.decode(payload + b"\x00", params, levels.size)
    with pytest.raises(CodecError, match="codes no bins"):
        level_coder.decode(payload, params, 0)
    with pytest.raises(CodecError, match="codes no bins"):
        level_coder.decode(payload, {**params, "max_abs": 0}, levels.size)
    with pytest.raises(CodecError, match="range"):
        level_coder.decode(b"\xff\xff\xff\xff\x01", params, levels.size)
    with pytest.raises(CodecError, match="bytes-like"):
        level_coder.decode("abc", params, levels.size)
    for count in (-1, 2.0, True):
        with pytest.raises(CodecError, match="count"):
            level_coder.decode(payload, params, count)


def test_levels_beyond_max_abs_are_rejected():
    payload, params = level_coder.encode(np.array([0, 100, -3, 0]), 2, num_gt=1)
    with pytest.raises(CodecError, match="max_abs"):
        level_coder.decode(payload, {**params, "max_abs": 50}, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prob_bits": 16}, "prob_bits"),
        ({"shifts": [4, 8]}, "shifts"),
        ({"shifts": [4.0, 7]}, "shifts"),
        ({"init_prob": 1}, "init_prob"),
        ({"context_model": "other"}, "context_model"),
        ({"row_length": 0}, "row_length"),
        ({"row_length": 2**31 + 1}, "row_length"),
        ({"max_abs": -1}, "max_abs"),
        ({"max_abs": 2**16 + 1}, "max_abs"),
        ({"max_abs": 3.0}, "max_abs"),
        ({"num_gt": 65}, "num_gt"),
        ({"num_gt": None}, "num_gt"),
        ({"extra": 1}, "keys"),
    ],
)
def test_malformed_params_are_codec_errors(stream, change, message):
    payload, params, levels = stream
    with pytest.raises(CodecError, match=message):
        level_coder.decode(payload, {**params, **change}, levels.size)
    with pytest.raises(CodecError, match="dict"):
        level_coder.validate_params([params])


def _decode_or_error(payload, params, count):
    try:
        decoded = level_coder.decode(payload, params, count)
    except CodecError:
        return None
    assert decoded.shape == (count,) and decoded.dtype == np.int32
    widest = 2 * params["max_abs"] if params["context_model"] == level_coder.DEPENDENT_CONTEXT_MODEL else params["max_abs"]
    assert decoded.size == 0 or int(np.abs(decoded.astype(np.int64)).max()) <= widest
    return decoded


@settings(max_examples=200, deadline=2000)
@given(
    garbage=st.binary(max_size=300),
    count=st.integers(0, 20_000),
    row_length=st.integers(1, 100),
    max_abs=st.integers(0, level_coder.MAX_ABS),
    num_gt=st.integers(0, level_coder.MAX_NUM_GT),
    dependent=st.booleans(),
)
def test_garbage_payloads_decode_to_an_error_or_bounded_levels(garbage, count, row_length, max_abs, num_gt, dependent):
    model = level_coder.DEPENDENT_CONTEXT_MODEL if dependent else level_coder.CONTEXT_MODEL
    _decode_or_error(garbage, level_coder.make_params(row_length, max_abs // 2 if dependent else max_abs, num_gt, model), count)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_and_flipped_payloads_never_crash(stream, data):
    payload, params, levels = stream
    cut = data.draw(st.integers(0, len(payload)))
    _decode_or_error(payload[:cut], params, levels.size)
    flipped = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        flipped[data.draw(st.integers(0, len(payload) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    decoded = _decode_or_error(bytes(flipped), params, levels.size)
    # the last byte's low bits can fall inside the final interval's slack and decode the same levels
    # (the file's payload CRC catches those); a flip anywhere before it changes the levels or is rejected
    assert decoded is None or not np.array_equal(decoded, levels) or bytes(flipped)[:-1] == payload[:-1]


def test_hostile_count_costs_only_its_output_array():
    # a few garbage bytes may claim millions of levels: decoding allocates the int32 output and
    # the context table, nothing in proportion to the payload's claims beyond that
    count = 2_000_000
    params = level_coder.make_params(1, level_coder.MAX_ABS, level_coder.MAX_NUM_GT)
    tracemalloc.start()
    try:
        try:
            level_coder.decode(b"\x12\x34\x56\x78\x9a", params, count)
        except CodecError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * count + (1 << 20)


def test_zero_probability_never_occurs():
    # runs of one bin value drive an estimate furthest; with the warm-up schedule the averaged
    # probability still stays in [35, 32732] of 2**15, so no bin ever gets an empty interval
    extremes = []
    for bit in (0, 1):
        p, seen = [level_coder.INIT_PROB, level_coder.INIT_PROB], 0
        lowest = highest = level_coder.INIT_PROB >> 1
        for _ in range(5000):
            rate = 1 + int(math.log2(seen + 1))
            shifts = [min(rate, cap) for cap in level_coder.SHIFTS]
            p = [q + ((65536 - q) >> s) if bit else q - (q >> s) for q, s in zip(p, shifts)]
            seen = min(seen + 1, 255)
            prob = (p[0] + p[1]) >> 2
            lowest, highest = min(lowest, prob), max(highest, prob)
        extremes.append(lowest if bit == 0 else highest)
    assert extremes == [35, 32732]
