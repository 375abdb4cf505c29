"""Tables and plots of a compressed model: per-layer summaries, weight histograms, sweep curves.

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot state and no global
backend switch, so importing this module never changes how the caller's matplotlib behaves.
PNGs are written atomically (temp file, then rename).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from .parametrizations import SharedWeights
from .errors import ConfigError
from .files import atomic_write
from .layers import resolve, select_weights

logger = logging.getLogger(__name__)

Column = tuple[str, str, Callable[[Any], str] | None]  # (row key, header, formatter; None = default)


# ---------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_summary(model: nn.Module, include: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per compressible weight (conv, fc, custom), from the effective (masked/shared) values.

    Returns:
        rows with keys id (1-based), name (FQN), type (layer class), params, nonzero, sparsity
        (fraction of zeros), bits (SharedWeights bits or None) and distinct (number of distinct
        non-zero values, for quantized weights only, else None).
    """
    rows = []
    for i, ref in enumerate(select_weights(model, include), start=1):
        module, name = resolve(model, ref.fqn)
        weight = getattr(module, name)
        shared = None
        if parametrize.is_parametrized(module, name):
            shared = next((p for p in module.parametrizations[name] if isinstance(p, SharedWeights)), None)
        params = weight.numel()
        nonzero = int(torch.count_nonzero(weight))
        rows.append({
            "id": i,
            "name": ref.fqn,
            "type": ref.layer_type,
            "params": params,
            "nonzero": nonzero,
            "sparsity": (params - nonzero) / params if params else 0.0,
            "bits": None if shared is None else shared.bits,
            "distinct": None if shared is None else int(torch.unique(weight[weight != 0]).numel()),
        })
    return rows


@torch.no_grad()
def effective_weights(model: nn.Module, include: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The values each compressible weight takes in the forward pass (masked/shared), as numpy."""
    weights = {}
    for ref in select_weights(model, include):
        module, name = resolve(model, ref.fqn)
        weights[ref.fqn] = getattr(module, name).detach().cpu().numpy()
    return weights


def summary_totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over layer rows: ``{"name": "total", "params", "nonzero", "sparsity"}``."""
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    sparsity = (params - nonzero) / params if params else 0.0
    return {"name": "total", "params": params, "nonzero": nonzero, "sparsity": sparsity}


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def _fmt_default(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_percent(value: Any) -> str:
    """0.875 -> '87.50%' (None -> '-')."""
    return "-" if value is None else f"{100 * value:.2f}%"


#: Columns for ``layer_summary`` rows (and their ``summary_totals`` row).
LAYER_COLUMNS: list[Column] = [
    ("id", "#", None),
    ("name", "layer", None),
    ("type", "type", None),
    ("params", "params", None),
    ("nonzero", "non-zero", None),
    ("sparsity", "sparsity", fmt_percent),
    ("bits", "bits", None),
    ("distinct", "distinct values", None),
]

def fmt_ratio(value: Any) -> str:
    """23.4567 -> '23.5x'."""
    return f"{value:.1f}x"


def _fmt_bits(value: float) -> str:
    return f"{value:,.0f}"


#: The caveat printed wherever the lab's estimate is (CLI, demo, report.md).
LAB_ESTIMATE_NOTE = ("the lab estimate is non-zero fraction x average weight code length / 32 over the coded "
                     "layers: it leaves out positions, codebooks and raw tensors, so it is an estimate, not a file size")

#: Columns for a pipeline run's per-stage metrics (``pipeline.run_recipe``).
STAGE_COLUMNS: list[Column] = [
    ("stage", "#", None),
    ("kind", "stage", None),
    ("accuracy", "accuracy", fmt_percent),
    ("nonzero", "non-zero", None),
    ("sparsity", "sparsity", fmt_percent),
    ("file_bytes", "file bytes", None),
    ("ratio", "ratio", fmt_ratio),
    ("entropy_bound_ratio", "entropy bound", fmt_ratio),
    ("lab_estimate_ratio", "lab estimate", fmt_ratio),
    ("decoded_accuracy", "decoded acc.", fmt_percent),
    ("seconds", "seconds", lambda v: f"{v:.1f}"),
]

#: Columns for ``format.FileReport.rows``: each coded stream's size beside its entropy.
FILE_COLUMNS: list[Column] = [
    ("name", "tensor", None),
    ("codec", "codec", None),
    ("shape", "shape", lambda v: "x".join(map(str, v)) or "scalar"),
    ("nonzero", "non-zero", None),
    ("bits", "bits", None),
    ("index_bits", "idx bits", None),
    ("fillers", "fillers", None),
    ("weight_stream_bits", "weight bits", None),
    ("weight_entropy_bits", "(entropy)", _fmt_bits),
    ("position_stream_bits", "position bits", None),
    ("position_entropy_bits", "(entropy)", _fmt_bits),
    ("stored_bytes", "stored B", None),
    ("bits_per_nonzero", "bits/nz", lambda v: f"{v:.2f}"),
]

_KNOWN = {key: (header, fmt) for key, header, fmt in LAYER_COLUMNS}


def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None) -> list[Column]:
    if columns is not None:
        return list(columns)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return [(k, *_KNOWN.get(k, (k, None))) for k in keys]


def _cell(row: dict[str, Any], key: str, fmt: Callable[[Any], str] | None) -> str:
    # a key missing from a row (e.g. "id" in a totals row) renders empty; None renders "-" without
    # reaching the formatter, so formatters only ever see real values
    if key not in row:
        return ""
    value = row[key]
    return "-" if value is None else (fmt or _fmt_default)(value)


def _cells(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[list[str]]:
    return [[_cell(r, key, fmt) for key, _, fmt in columns] for r in rows]


def _numeric(rows: Sequence[dict[str, Any]], key: str) -> bool:
    values = [r[key] for r in rows if r.get(key) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def render_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None, title: str | None = None
) -> Table:
    """A rich Table of ``rows``; ``columns`` defaults to every key seen, with known keys given nice headers.

    Args:
        rows: dicts (layer summaries, stage results, sweep points...).
        columns: ``(key, header, formatter)`` triples, e.g. ``LAYER_COLUMNS``; default: every key seen.
            A formatter None uses thousands separators / 4 significant digits; None values show '-' and a
            key missing from a row shows empty.
        title: optional table title.
    """
    columns = _columns(rows, columns)
    table = Table(title=title)
    for key, header, _ in columns:
        table.add_column(header, justify="right" if _numeric(rows, key) else "left")
    for cells in _cells(rows, columns):
        table.add_row(*cells)
    return table


def table_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[Column] | None = None) -> str:
    """The same table as GitHub markdown (numeric columns right-aligned), ending with a newline."""
    columns = _columns(rows, columns)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if _numeric(rows, key) else "---" for key, _, _ in columns]
    out = [line([h for _, h, _ in columns]), "|" + "|".join(align) + "|"]
    out += [line(cells) for cells in _cells(rows, columns)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def histogram_figure(stages: dict[str, np.ndarray], title: str = "", bins: int = 100, discrete_max: int = 256):
    """A Figure with one histogram subplot per stage (in dict order).

    Panels whose array holds exact zeros (pruned entries) leave the zeros out and say "non-zero weights".
    When a panel has at most ``discrete_max`` distinct values (quantized weights) it draws one bar per
    distinct value, height = count, so a 2-bit layer shows exactly 4 bars; otherwise a ``bins``-bin histogram.
    """
    if not stages:
        raise ConfigError("histogram_figure needs at least one stage")
    fig = _new_figure(4.2 * len(stages), 3.4)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, (stage, values) in zip(axes, stages.items()):
        v = np.asarray(values, dtype=np.float64).ravel()
        n_all = v.size
        v = v[np.isfinite(v)]
        label = stage
        if (v == 0).any():
            v = v[v != 0]
            label += f"\nnon-zero weights ({v.size:,} of {n_all:,})"
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        if v.size == 0:
            ax.text(0.5, 0.5, "no non-zero weights", ha="center", va="center", transform=ax.transAxes)
            continue
        distinct, counts = np.unique(v, return_counts=True)
        if distinct.size <= discrete_max:
            spacing = np.diff(distinct).min() if distinct.size > 1 else max(abs(distinct[0]), 1e-3)
            span = distinct[-1] - distinct[0]
            width = min(0.8 * spacing, 0.02 * span) if span > 0 else 0.8 * spacing
            ax.bar(distinct, counts, width=width, color="tab:orange", edgecolor="black", linewidth=0.5)
        else:
            ax.hist(v, bins=bins, color="tab:blue")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "weight"


def weight_histograms(
    weights: dict[str, dict[str, np.ndarray]], out_dir: str | Path, bins: int = 100
) -> list[Path]:
    """One PNG per layer with one histogram panel per stage (see ``histogram_figure``).

    Args:
        weights: ``{layer fqn: {stage name: values}}``, e.g. stages "before pruning", "after pruning",
            "after quantization".
        out_dir: created if missing; files are named ``hist_<fqn>.png``.
        bins: bins of the continuous histograms.

    Returns:
        the written paths, in the order of ``weights``.
    """
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for fqn, stages in weights.items():
        path = out_dir / f"hist_{_safe_name(fqn)}.png"
        if path in paths:  # two names that differ only in unsafe characters
            path = out_dir / f"hist_{_safe_name(fqn)}_{len(paths)}.png"
        paths.append(_save_png(histogram_figure(stages, title=fqn, bins=bins), path))
    logger.debug("wrote %d weight histograms to %s", len(paths), out_dir)
    return paths


def line_plot(
    x: Sequence[float], ys: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str, path: str | Path
) -> Path:
    """One line per ``ys`` entry against ``x`` (e.g. accuracy vs sparsity or bits); returns the PNG path."""
    for label, y in ys.items():
        if len(y) != len(x):
            raise ConfigError(f"line_plot: series {label!r} has {len(y)} points, x has {len(x)}")
    fig = _new_figure(6, 4)
    ax = fig.subplots()
    for label, y in ys.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ys:
        ax.legend()
    return _save_png(fig, path)


def sparsity_bars(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Horizontal bar chart of each layer's sparsity (%) from ``layer_summary`` rows; returns the PNG path."""
    names = [r["name"] for r in rows]
    values = [100 * r["sparsity"] for r in rows]
    fig = _new_figure(6, 1.2 + 0.3 * max(len(rows), 1))
    ax = fig.subplots()
    ax.barh(range(len(rows)), values, color="tab:green")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()  # first layer on top, as in the tables
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (% of weights pruned)")
    ax.set_title("per-layer sparsity")
    return _save_png(fig, path)
