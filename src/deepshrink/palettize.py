"""Weight sharing inside an ONNX graph: float initializers with few distinct values as indices + codebook.

Pure functions of numpy arrays and of an ``onnx.ModelProto`` (``palettize`` imports ``onnx`` when
called); ``export.to_onnx(..., palettized=True)`` applies them to the exported graph.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MAX_LEVELS = 1 << 16  # uint16 indices at most (uint8 up to 256 levels: 8-bit conv weights and zero need 257)
NODE_OVERHEAD_BYTES = 160  # two nodes and two initializer records: palettize only where it saves more


@dataclasses.dataclass(frozen=True)
class PalettizedTensor:
    """One initializer stored as indices plus codebook."""

    name: str
    shape: tuple[int, ...]
    levels: int  # codebook entries
    index_bits: int  # 4 (uint4), 8 (uint8) or 16 (uint16)
    dense_bytes: int  # as float32
    stored_bytes: int  # indices + codebook


def palette(values: np.ndarray, max_levels: int = MAX_LEVELS) -> tuple[np.ndarray, np.ndarray] | None:
    """(codebook float32 (K,), indices of ``values``' shape, uint8 for K <= 256, else uint16) with
    ``codebook[indices] == values``, or None above ``max_levels`` distinct values. 0.0, where present,
    is index 0."""
    flat = values.reshape(-1)
    if len(np.unique(flat[: 4 * max_levels])) > max_levels:  # cheap early exit for unshared weights
        return None
    codebook, inverse = np.unique(flat, return_inverse=True)
    if len(codebook) > max_levels:
        return None
    zero = np.flatnonzero(codebook == 0)
    if zero.size and zero[0] != 0:  # move 0.0 to the front: pruned weights are index 0
        order = np.concatenate([zero, np.delete(np.arange(len(codebook)), zero)])
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        codebook, inverse = codebook[order], rank[inverse]
    dtype = np.uint8 if len(codebook) <= 256 else np.uint16
    return codebook.astype(np.float32), inverse.reshape(values.shape).astype(dtype)


def pack_uint4(indices: np.ndarray) -> bytes:
    """ONNX uint4 layout: two indices (< 16) per byte, the first in the low nibble, zero-padded."""
    flat = indices.reshape(-1).astype(np.uint8)
    if len(flat) % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def palettize(proto, *, packed: bool = False) -> list[PalettizedTensor]:
    """Rewrite ``proto``'s float32 initializers that have few distinct values as indices + codebook.

    Each becomes ``NAME::indices`` (uint8, uint16 above 256 levels, uint4 when ``packed`` and <= 16) and
    ``NAME::codebook`` (float32), with ``Cast`` and ``Gather`` nodes, placed first, producing ``NAME``
    again, so every consumer is unchanged. Only where that makes the file smaller; graph inputs and
    external data are left alone. Returns what was rewritten.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inputs = {i.name for i in graph.input}
    used = names_in(graph)
    kept, added, nodes, done = [], [], [], []
    for init in graph.initializer:
        if (init.data_type != TensorProto.FLOAT or init.name in inputs
                or init.data_location == TensorProto.EXTERNAL):
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        found = palette(values)
        if found is None:
            kept.append(init)
            continue
        codebook, indices = found
        bits = 4 if packed and len(codebook) <= 16 else 8 * indices.itemsize
        stored = math.ceil(indices.size * bits / 8) + codebook.nbytes
        if stored + NODE_OVERHEAD_BYTES >= values.nbytes:
            kept.append(init)
            continue
        index_name, codebook_name, int_name = (_fresh(f"{init.name}::{suffix}", used)
                                               for suffix in ("indices", "codebook", "indices_int32"))
        if bits == 4:
            added.append(helper.make_tensor(index_name, TensorProto.UINT4, indices.shape, pack_uint4(indices),
                                            raw=True))
        else:
            added.append(numpy_helper.from_array(indices, index_name))
        added.append(numpy_helper.from_array(codebook, codebook_name))
        # Gather takes int32/int64 indices only, so the unsigned indices are cast first
        nodes.append(helper.make_node("Cast", [index_name], [int_name], to=TensorProto.INT32,
                                      name=f"{init.name}::cast"))
        nodes.append(helper.make_node("Gather", [codebook_name, int_name], [init.name], axis=0,
                                      name=f"{init.name}::gather"))
        done.append(PalettizedTensor(init.name, tuple(values.shape), len(codebook), bits, values.nbytes, stored))
    if done:
        original_nodes = list(graph.node)
        del graph.initializer[:]
        graph.initializer.extend(kept + added)
        del graph.node[:]
        graph.node.extend(nodes + original_nodes)
    return done


def names_in(graph) -> set[str]:
    """Every tensor and node name of an ONNX graph (subgraphs aside)."""
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input, node.output, [node.name])
    return names


def _fresh(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        candidate, n = f"{name}_{n}", n + 1
    used.add(candidate)
    return candidate
