import heapq
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepshrink.coding import CODERS, Coder, CoderName, entropy_bits, get_coder, histogram
from deepshrink.coding import ans as ans_module
from deepshrink.coding.huffman import (
    MAX_CODE_LENGTH,
    HuffmanCoder,
    canonical_codes,
    code_lengths,
    kraft_excess,
    lengths_from_text,
    lengths_to_text,
)
from deepshrink.errors import CodecError, ConfigError

HUFFMAN = get_coder("huffman")
ANS = get_coder("ans")
BOTH = pytest.mark.parametrize("coder", list(CODERS.values()), ids=list(CODERS))  # every registered coder


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile the numba kernels once so per-example deadlines time the coders, not the compiler."""
    for coder in (HUFFMAN, ANS):
        payload, params = coder.encode(np.array([0, 1, 1, 2]), 3)
        coder.decode(payload, params, 4, 3)


def reference_huffman_cost(counts):
    """Total coded bits of a textbook Huffman code: the sum of all merged weights (1 bit each if one symbol)."""
    heap = [c for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def brute_force_limited_cost(counts, limit):
    """Cheapest sum(count*length) over all length vectors in 1..limit obeying Kraft (tiny inputs only)."""
    best = None
    for lengths in itertools.product(range(1, limit + 1), repeat=len(counts)):
        if sum(2.0**-l for l in lengths) <= 1:
            cost = sum(c * l for c, l in zip(counts, lengths))
            best = cost if best is None else min(best, cost)
    return best


def fibonacci(n):
    values = [1, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


def sample(rng, n, alphabet_size, kind):
    if kind == "uniform":
        return rng.integers(0, alphabet_size, n)
    if kind == "constant":
        return np.full(n, rng.integers(0, alphabet_size))
    weights = np.exp(-np.arange(alphabet_size) / max(alphabet_size / 8, 0.5))  # peaked, like weight clusters
    return rng.choice(alphabet_size, size=n, p=weights / weights.sum())


# --- registry --------------------------------------------------------------------------------


def test_registry_holds_both_coders_under_their_enum_names():
    assert set(CODERS) == {"huffman", "ans"}
    assert get_coder(CoderName.ANS) is ANS and HUFFMAN.name == "huffman"
    assert all(isinstance(c, Coder) for c in CODERS.values())


def test_unknown_coder_is_a_config_error_listing_valid_names():
    with pytest.raises(ConfigError, match=r"'lzma'.*\['ans', 'huffman'\]"):
        get_coder("lzma")


def test_entropy_bits_known_values():
    assert entropy_bits(np.array([0, 1]), 2) == pytest.approx(2.0)
    assert entropy_bits(np.array([3, 3, 3]), 4) == 0.0
    assert entropy_bits(np.zeros(0, np.uint8), 4) == 0.0
    # p = (1/2, 1/4, 1/4): 1.5 bits per symbol
    assert entropy_bits(np.array([0, 0, 1, 2]), 3) == pytest.approx(6.0)


# --- Huffman golden vectors (worked by hand) ------------------------------------------------


def test_golden_three_symbols():
    # counts (3, 1, 1): merge 1+1 -> 2, then 2+3 -> lengths (1, 2, 2).
    # canonical: sym0 = 0, sym1 = 10, sym2 = 11.
    # stream 0 0 0 10 11 = 0001011, padded -> 00010110 = 0x16.
    payload, params = HUFFMAN.encode(np.array([0, 0, 0, 1, 2], dtype=np.uint8), 3)
    assert params == {"code_lengths": "122", "bit_order": "msb"}
    assert payload == b"\x16"


def test_golden_four_symbols_with_a_three_bit_code():
    # counts (1, 1, 2, 4): 1+1 -> 2, 2+2 -> 4, 4+4 -> lengths (3, 3, 2, 1).
    # canonical by (length, symbol): sym3 = 0, sym2 = 10, sym0 = 110, sym1 = 111.
    # stream 0 1 2 3 3 2 3 3 -> 110 111 10 0 0 10 0 0 = 11011110 001000(00) = 0xDE 0x20.
    symbols = np.array([0, 1, 2, 3, 3, 2, 3, 3])
    payload, params = HUFFMAN.encode(symbols, 4)
    assert params["code_lengths"] == "3321"
    assert payload == b"\xde\x20"
    assert HUFFMAN.decode(payload, params, 8, 4).tolist() == symbols.tolist()


def test_golden_single_used_symbol_gets_a_one_bit_zero_code():
    # only symbol 2 occurs: length 1, code 0; three symbols = 000, padded -> 0x00.
    # unused symbols get length 0, and the table stops at the last used symbol.
    payload, params = HUFFMAN.encode(np.array([2, 2, 2]), 4)
    assert params["code_lengths"] == "001"
    assert payload == b"\x00"
    assert HUFFMAN.decode(payload, params, 3, 4).tolist() == [2, 2, 2]


def test_empty_stream_gives_empty_payload():
    for coder in (HUFFMAN, ANS):
        payload, params = coder.encode(np.zeros(0, dtype=np.int64), 5)
        assert payload == b""
        decoded = coder.decode(payload, params, 0, 5)
        assert decoded.dtype == np.uint32 and decoded.shape == (0,)


def test_canonical_codes_follow_length_then_symbol_order():
    # lengths (2, 1, 3, 3, 0): sym1 = 0, sym0 = 10, sym2 = 110, sym3 = 111, sym4 unused.
    assert canonical_codes(np.array([2, 1, 3, 3, 0])).tolist() == [0b10, 0b0, 0b110, 0b111, 0]


# --- code lengths: Kraft, optimality, the length cap ----------------------------------------


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
def test_code_lengths_are_kraft_complete_and_as_short_as_huffman(counts):
    lengths = code_lengths(np.array(counts))
    used = np.array(counts) > 0
    assert (lengths[~used] == 0).all() and (lengths[used] >= 1).all()
    if used.sum() >= 2:
        assert kraft_excess(lengths) == 0
    if used.any():
        assert int(np.dot(counts, lengths)) == reference_huffman_cost(counts)


@given(st.lists(st.integers(1, 300), min_size=2, max_size=6), st.integers(3, 4))
def test_length_limited_code_is_optimal_among_limited_codes(counts, limit):
    limit = max(limit, math.ceil(math.log2(len(counts))))
    lengths = code_lengths(np.array(counts), max_length=limit)
    assert lengths.max() <= limit and kraft_excess(lengths) <= 0
    assert int(np.dot(counts, lengths)) == brute_force_limited_cost(counts, limit)


def test_fibonacci_counts_respect_the_default_cap():
    counts = np.array(fibonacci(40))  # unlimited Huffman would build a 39-deep chain
    lengths = code_lengths(counts)
    assert lengths.max() == MAX_CODE_LENGTH
    assert kraft_excess(lengths) == 0
    assert int(counts @ lengths) >= reference_huffman_cost(counts.tolist())


def test_fibonacci_stream_with_long_codes_round_trips():
    # 27 Fibonacci counts (~500k symbols) need 26-bit Huffman codes: the 24-bit cap binds, and codes
    # longer than the decoder's 11-bit table exercise its fallback search.
    counts = fibonacci(27)
    rng = np.random.default_rng(0)
    symbols = rng.permutation(np.repeat(np.arange(27), counts))
    payload, params = HUFFMAN.encode(symbols, 27)
    assert lengths_from_text(params["code_lengths"], 27).max() == MAX_CODE_LENGTH
    assert np.array_equal(HUFFMAN.decode(payload, params, symbols.size, 27), symbols)


def test_smaller_cap_is_honoured_and_round_trips():
    coder = HuffmanCoder(max_code_length=8)
    symbols = np.repeat(np.arange(15), fibonacci(15))
    payload, params = coder.encode(symbols, 15)
    assert lengths_from_text(params["code_lengths"], 15).max() == 8
    assert np.array_equal(coder.decode(payload, params, symbols.size, 15), symbols)


def test_cap_too_small_for_the_alphabet_is_a_config_error():
    with pytest.raises(ConfigError, match="max_code_length"):
        code_lengths(np.ones(9), max_length=3)
    with pytest.raises(ConfigError, match="max_code_length"):
        code_lengths(np.ones(9), max_length=MAX_CODE_LENGTH + 1)
    with pytest.raises(ConfigError, match="max_code_length"):
        HuffmanCoder(max_code_length=25)


# --- round trips ------------------------------------------------------------------------------


@BOTH
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 5000)),
    alphabet_size=st.one_of(st.sampled_from([1, 2, 256, 300]), st.integers(1, 300)),
    kind=st.sampled_from(["uniform", "skewed", "constant"]),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.uint64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip(coder, n, alphabet_size, kind, dtype, seed):
    if np.iinfo(dtype).max < alphabet_size - 1:
        dtype = np.int64
    symbols = sample(np.random.default_rng(seed), n, alphabet_size, kind).astype(dtype)
    payload, params = coder.encode(symbols, alphabet_size)
    assert json.loads(json.dumps(params)) == params
    coder.validate_params(params, alphabet_size)
    decoded = coder.decode(payload, json.loads(json.dumps(params)), n, alphabet_size)
    assert decoded.dtype == np.uint32
    assert np.array_equal(decoded, symbols)


@BOTH
def test_all_one_symbol_of_a_one_symbol_alphabet(coder):
    symbols = np.zeros(10_000, dtype=np.uint8)
    payload, params = coder.encode(symbols, 1)
    assert np.array_equal(coder.decode(payload, params, symbols.size, 1), symbols)
    # Huffman pays 1 bit per symbol; ANS next to nothing (the coder's final state)
    assert len(payload) == 1250 if coder is HUFFMAN else len(payload) <= 8


@BOTH
def test_bad_symbols_are_codec_errors(coder):
    with pytest.raises(CodecError, match=r"\[0, 3\]"):
        coder.encode(np.array([0, 3]), 3)
    with pytest.raises(CodecError, match="1-D"):
        coder.encode(np.zeros((2, 2), dtype=np.uint8), 3)
    with pytest.raises(CodecError, match="integer dtype"):
        coder.encode(np.array([0.0, 1.0]), 3)
    with pytest.raises(CodecError, match=r"\[-1, 1\]"):
        coder.encode(np.array([-1, 1]), 3)
    with pytest.raises(CodecError, match="alphabet_size"):
        coder.encode(np.array([0]), 0)
    with pytest.raises(CodecError, match="alphabet_size"):
        coder.encode(np.array([0]), 70_000)


# --- coded size ------------------------------------------------------------------------------


def test_coded_sizes_against_entropy_on_a_large_sample():
    rng = np.random.default_rng(1)
    symbols = sample(rng, 300_000, 32, "skewed").astype(np.uint8)
    bound = entropy_bits(symbols, 32)
    huffman_payload, _ = HUFFMAN.encode(symbols, 32)
    ans_payload, ans_params = ANS.encode(symbols, 32)
    # Huffman: at most 1 bit per symbol over the entropy (plus the final byte's padding)
    assert bound <= 8 * len(huffman_payload) <= bound + symbols.size + 8
    # ANS: the payload alone is within 0.1% (plus the coder's final state words); the table is extra
    assert 8 * len(ans_payload) <= 1.001 * bound + 64
    table_bits = 8 * len(json.dumps(ans_params["frequencies"]))
    assert 8 * len(ans_payload) + table_bits < 8 * len(huffman_payload)


@pytest.mark.parametrize("precision", [24, 20])
def test_ans_model_is_exactly_the_stored_table(precision):
    # symbol 1 has probability 3 / 2**precision: a one-unit error in constriction's 24-bit table would
    # move 1000 symbols' cost by more than 400 bits at precision 24
    import constriction

    freqs = np.array([(1 << precision) - 5, 3, 1], dtype=np.int64)  # + the marker's unit = 2**precision
    model = ans_module._model(freqs, precision)
    for symbol, frequency in [(1, 3), (2, 1)]:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.full(1000, symbol + ans_module.SYMBOL_OFFSET, dtype=np.int32), model)
        ideal = 1000 * (precision - math.log2(frequency))
        assert abs(coder.num_bits() - ideal) <= 64


@pytest.mark.parametrize("tail", [0, 1])
def test_ans_rejects_a_wrong_count_whatever_the_stream_ends_with(tail):
    # constriction's empty coder decodes model index 0 forever: the reserved marker makes that visible
    symbols = np.array([1, 0] * 500 + [tail] * 500)
    payload, params = ANS.encode(symbols, 2)
    assert np.array_equal(ANS.decode(payload, params, symbols.size, 2), symbols)
    for wrong in (symbols.size - 1, symbols.size + 1):
        with pytest.raises(CodecError, match="wrong count"):
            ANS.decode(payload, params, wrong, 2)


def test_ans_precision_adapts_to_stream_length():
    rng = np.random.default_rng(2)
    short = ANS.encode(sample(rng, 200, 16, "skewed"), 16)[1]
    long = ANS.encode(sample(rng, 200_000, 16, "skewed"), 16)[1]
    assert short["precision"] < long["precision"] <= 24
    for params in (short, long):
        assert sum(params["frequencies"]) == (1 << params["precision"]) - 1 and min(params["frequencies"]) >= 1


@BOTH
def test_tables_stop_at_the_largest_symbol_present(coder):
    symbols = np.array([0, 4, 4, 1])
    payload, params = coder.encode(symbols, 300)
    table = params["code_lengths"] if coder is HUFFMAN else params["frequencies"]
    assert len(table) == 5
    assert np.array_equal(coder.decode(payload, params, 4, 300), symbols)


def test_histogram_counts_every_symbol():
    assert histogram(np.array([2, 0, 2, 2], dtype=np.uint16), 4).tolist() == [1, 0, 3, 0]


# --- malformed input ---------------------------------------------------------------------------


@pytest.fixture
def huffman_stream():
    symbols = np.array([0, 1, 2, 3, 3, 2, 3, 3] * 5)
    payload, params = HUFFMAN.encode(symbols, 4)
    return payload, params, symbols.size


@pytest.fixture
def ans_stream():
    symbols = sample(np.random.default_rng(3), 2000, 10, "skewed")
    payload, params = ANS.encode(symbols, 10)
    return payload, params, symbols.size


def test_huffman_payload_damage_is_detected(huffman_stream):
    payload, params, count = huffman_stream
    with pytest.raises(CodecError, match="ends before|too short"):
        HUFFMAN.decode(payload[:-1], params, count, 4)
    with pytest.raises(CodecError, match="trailing"):
        HUFFMAN.decode(payload + b"\x00", params, count, 4)
    with pytest.raises(CodecError, match="too short"):
        HUFFMAN.decode(payload, params, 8 * len(payload) + 1, 4)
    with pytest.raises(CodecError, match="count is 0"):
        HUFFMAN.decode(payload, params, 0, 4)


def test_huffman_nonzero_padding_and_unassigned_codes_are_rejected():
    payload, params = HUFFMAN.encode(np.array([0, 0, 0, 1, 2]), 3)  # 0001011 + one pad bit
    with pytest.raises(CodecError, match="padding"):
        HUFFMAN.decode(bytes([payload[0] | 1]), params, 5, 3)
    # one used symbol: code "0" only, so a 1 bit is no code
    payload, params = HUFFMAN.encode(np.array([1, 1]), 2)
    with pytest.raises(CodecError, match="no code"):
        HUFFMAN.decode(b"\x40", params, 2, 2)


def test_code_length_text_round_trips_and_drops_unused_tail():
    lengths = np.array([3, 0, 10, 24, 1, 0, 0])
    assert lengths_to_text(lengths) == "30ao1"
    assert lengths_from_text("30ao1", 7).tolist() == lengths.tolist()
    assert lengths_to_text(np.zeros(4, dtype=np.int64)) == ""


@pytest.mark.parametrize(
    "lengths, message",
    [
        ("1110", "Kraft"),
        ("12223", "more than alphabet_size"),
        ("p122", "0-9a-o"),
        ("-122", "0-9a-o"),
        ("A122", "0-9a-o"),
        ("1\u00e922", "0-9a-o"),
        ([1, 2, 2], "string"),
        (1222, "string"),
        (None, "string"),
        ("", "all 0"),
        ("0000", "all 0"),
    ],
)
def test_malformed_huffman_params_are_codec_errors(huffman_stream, lengths, message):
    payload, params, count = huffman_stream
    with pytest.raises(CodecError, match=message):
        HUFFMAN.decode(payload, {**params, "code_lengths": lengths}, count, 4)


@pytest.mark.parametrize(
    "params, message",
    [
        (None, "dict"),
        ({"code_lengths": "11"}, "keys"),
        ({"code_lengths": "11", "bit_order": "lsb"}, "bit_order"),
        ({"code_lengths": "11", "bit_order": "msb", "extra": 1}, "keys"),
    ],
)
def test_malformed_huffman_param_dicts_are_codec_errors(params, message):
    with pytest.raises(CodecError, match=message):
        HUFFMAN.validate_params(params, 2)


@BOTH
def test_non_bytes_payload_is_a_codec_error(coder):
    _, params = coder.encode(np.array([0, 1]), 2)
    with pytest.raises(CodecError, match="bytes-like"):
        coder.decode("0101", params, 2, 2)


@BOTH
@pytest.mark.parametrize("count", [-1, 2.0, True, "3"])
def test_bad_counts_are_codec_errors(coder, count):
    payload, params = coder.encode(np.array([0, 1]), 2)
    with pytest.raises(CodecError, match="count"):
        coder.decode(payload, params, count, 2)


def test_ans_payload_damage_is_detected(ans_stream):
    payload, params, count = ans_stream
    with pytest.raises(CodecError, match="whole number"):
        ANS.decode(payload[:-1], params, count, 10)
    with pytest.raises(CodecError, match="does not end|rejected"):
        ANS.decode(payload[:-4], params, count, 10)
    with pytest.raises(CodecError, match="does not end"):
        ANS.decode(payload + b"\x01\x00\x00\x00", params, count, 10)
    with pytest.raises(CodecError, match="zero word"):
        ANS.decode(payload + b"\x00\x00\x00\x00", params, count, 10)
    with pytest.raises(CodecError, match="wrong count"):
        ANS.decode(payload, params, count - 1, 10)
    with pytest.raises(CodecError, match="count is 0"):
        ANS.decode(payload, params, 0, 10)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"frequencies": "many"}, "list"),
        ({"frequencies": [1] * 11}, "11 entries"),
        ({"frequencies": []}, "0 entries"),
        ({"precision": 25}, "precision"),
        ({"precision": -1}, "precision"),
        ({"precision": 3.0}, "precision"),
        ({"perfect": True}, "perfect"),
        ({"word_bits": 16}, "word_bits"),
        ({"symbol_offset": 0}, "symbol_offset"),
        ({"model_precision": 16}, "model_precision"),
        ({"state_bits": 64.0}, "state_bits"),
    ],
)
def test_malformed_ans_params_are_codec_errors(ans_stream, change, message):
    payload, params, count = ans_stream
    with pytest.raises(CodecError, match=message):
        ANS.decode(payload, {**params, **change}, count, 10)


def test_ans_frequency_tables_must_be_positive_ints_summing_to_the_precision(ans_stream):
    payload, params, count = ans_stream
    freqs = params["frequencies"]
    for bad, message in [
        ([freqs[0] + 1] + freqs[1:], "sum to"),
        ([0, freqs[0] + freqs[1]] + freqs[2:], "outside"),
        ([-1, freqs[0] + freqs[1] + 1] + freqs[2:], "outside"),
        ([float(freqs[0])] + freqs[1:], "ints"),
        ([2**70] + freqs[1:], "outside"),
    ]:
        with pytest.raises(CodecError, match=message):
            ANS.decode(payload, {**params, "frequencies": bad}, count, 10)
    with pytest.raises(CodecError, match="keys"):
        ANS.validate_params({k: v for k, v in params.items() if k != "perfect"}, 10)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)


@BOTH
@settings(max_examples=50, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=json_values,
    key=st.sampled_from(["code_lengths", "bit_order", "frequencies", "precision", "perfect", "word_bits"]),
)
def test_arbitrary_json_params_only_ever_raise_codec_errors(coder, value, key):
    _, params = coder.encode(np.array([0, 1, 1, 2, 2, 2]), 3)
    for candidate in (value, {**params, key: value}):
        try:
            coder.validate_params(candidate, 3)
        except CodecError:
            continue


@BOTH
@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.binary(max_size=400),
    count=st.integers(0, 5000),
    alphabet_size=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_garbage_payloads_decode_to_an_error_or_bounded_symbols(coder, garbage, count, alphabet_size, seed):
    symbols = sample(np.random.default_rng(seed), 300, alphabet_size, "skewed")
    _, params = coder.encode(symbols, alphabet_size)
    try:
        decoded = coder.decode(garbage, params, count, alphabet_size)
    except CodecError:
        return
    assert decoded.shape == (count,) and decoded.dtype == np.uint32
    assert decoded.size == 0 or int(decoded.max()) < alphabet_size


@settings(max_examples=150, deadline=2000)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    stretch=st.lists(st.integers(0, 12), min_size=40, max_size=40),
    garbage=st.binary(max_size=200),
    count=st.integers(0, 2000),
)
def test_hostile_but_valid_lengths_decode_garbage_safely(counts, stretch, garbage, count):
    # lengthening codes keeps Kraft <= 1 but leaves holes: incomplete codes, codes past the table, gaps
    lengths = code_lengths(np.array(counts))
    lengths = np.where(lengths > 0, np.minimum(lengths + np.array(stretch[: len(counts)]), MAX_CODE_LENGTH), 0)
    params = {"code_lengths": lengths_to_text(lengths), "bit_order": "msb"}
    try:
        decoded = HUFFMAN.decode(garbage, params, count, len(counts))
    except CodecError:
        return
    assert decoded.shape == (count,)
    assert all(lengths[s] > 0 for s in np.unique(decoded))
