"""Per-layer summaries, tables (rich and markdown) and plots of a compressed model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from rich.console import Console
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.parametrizations import SharedWeights
from deepshrink.errors import ConfigError
from deepshrink.prune import apply_mask
from deepshrink.report import (
    LAYER_COLUMNS,
    histogram_figure,
    layer_summary,
    line_plot,
    render_table,
    sparsity_bars,
    summary_totals,
    table_markdown,
    weight_histograms,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_made_model() -> nn.Sequential:
    """conv (8 weights, 3 pruned) -> fc 4x3 (quantized: 2 centroids, 5 zeros) -> fc 2x3 (dense)."""
    model = nn.Sequential(nn.Conv2d(1, 2, (2, 2)), nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 9.0).reshape(2, 1, 2, 2))
        model[3].weight.fill_(0.5)
    keep = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    keep.view(-1)[[0, 3, 6]] = False
    apply_mask(model, "0.weight", keep)
    indices = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2], [0, 0, 2, 1]], dtype=torch.uint8)
    parametrize.register_parametrization(model[2], "weight", SharedWeights(torch.tensor([-0.25, 0.75]), indices, 1))
    return model


def test_layer_summary_counts_effective_weights():
    rows = layer_summary(hand_made_model())
    assert rows == [
        {"id": 1, "name": "0.weight", "type": "Conv2d", "params": 8, "nonzero": 5, "sparsity": 3 / 8,
         "bits": None, "distinct": None},
        {"id": 2, "name": "2.weight", "type": "Linear", "params": 12, "nonzero": 7, "sparsity": 5 / 12,
         "bits": 1, "distinct": 2},
        {"id": 3, "name": "3.weight", "type": "Linear", "params": 6, "nonzero": 6, "sparsity": 0.0,
         "bits": None, "distinct": None},
    ]
    assert [r["name"] for r in layer_summary(hand_made_model(), include=("2.*",))] == ["2.weight"]
    assert summary_totals(rows) == {"name": "total", "params": 26, "nonzero": 18, "sparsity": 8 / 26}
    assert summary_totals([])["sparsity"] == 0.0


def test_table_markdown_text():
    rows = layer_summary(hand_made_model())
    rows.append(summary_totals(rows))
    columns = [("name", "layer", None), ("params", "params", None), ("sparsity", "sparsity", lambda v: f"{v:.1%}"),
               ("bits", "bits", lambda v: f"{v:d} bit")]  # formatters never see None
    assert table_markdown(rows, columns) == (
        "| layer | params | sparsity | bits |\n"
        "|---|---:|---:|---:|\n"
        "| 0.weight | 8 | 37.5% | - |\n"
        "| 2.weight | 12 | 41.7% | 1 bit |\n"
        "| 3.weight | 6 | 0.0% | - |\n"
        "| total | 26 | 30.8% |  |\n"
    )
    lines = table_markdown(rows, LAYER_COLUMNS).splitlines()
    assert lines[0] == "| # | layer | type | params | non-zero | sparsity | bits | distinct values |"
    assert lines[3] == "| 2 | 2.weight | Linear | 12 | 7 | 41.67% | 1 | 2 |"
    assert lines[-1] == "|  | total |  | 26 | 18 | 30.77% |  |  |"


def test_table_markdown_default_columns_and_escaping():
    text = table_markdown([{"stage": "prune|retrain", "accuracy": 0.98765, "size": 1234567}])
    assert text.splitlines() == [
        "| stage | accuracy | size |",
        "|---|---:|---:|",
        "| prune\\|retrain | 0.9877 | 1,234,567 |",
    ]


def test_render_table_matches_markdown_cells():
    rows = layer_summary(hand_made_model())
    table = render_table(rows, title="layers")
    assert table.title == "layers"
    assert [c.header for c in table.columns] == ["#", "layer", "type", "params", "non-zero", "sparsity", "bits",
                                                 "distinct values"]
    assert table.row_count == 3
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "37.50%" in text and "41.67%" in text and "Conv2d" in text


def bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]


def test_histogram_figure_quantized_panel_has_one_bar_per_value():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 0.1, 2000)
    after_pruning = np.where(np.abs(before) > 0.05, before, 0.0)
    centroids = np.array([-0.15, -0.07, 0.06, 0.14])  # 2 bits: 4 shared values
    after_quantization = np.where(after_pruning != 0, centroids[rng.integers(0, 4, 2000)], 0.0)
    fig = histogram_figure(
        {"before pruning": before, "after pruning": after_pruning, "after quantization": after_quantization},
        bins=50,
    )
    ax_before, ax_pruned, ax_quant = fig.axes
    heights = bar_heights(ax_quant)
    assert len(heights) == 4
    assert sum(heights) == np.count_nonzero(after_quantization)  # zeros excluded
    assert sorted(heights) == sorted(np.unique(after_quantization[after_quantization != 0], return_counts=True)[1])
    assert "non-zero weights" in ax_pruned.get_title() and "non-zero weights" in ax_quant.get_title()
    assert "non-zero" not in ax_before.get_title()
    assert len(bar_heights(ax_before)) == 50 and sum(bar_heights(ax_before)) == 2000
    assert sum(bar_heights(ax_pruned)) == np.count_nonzero(after_pruning)


def test_weight_histograms_write_pngs(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=500)
    paths = weight_histograms(
        {"features.0.weight": {"before pruning": w, "after pruning": np.where(np.abs(w) > 1, w, 0)},
         "fc/1.weight": {"after quantization": np.zeros(10)}},
        tmp_path / "hist",
    )
    assert [p.name for p in paths] == ["hist_features.0.weight.png", "hist_fc_1.weight.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "hist").glob(".*.tmp"))  # atomic write left no temp files
    with pytest.raises(ConfigError, match="bins must be >= 1"):
        weight_histograms({"a": {"s": w}}, tmp_path, bins=0)


def test_line_plot_and_sparsity_bars(tmp_path):
    path = line_plot([0.5, 0.8, 0.9], {"top-1": [0.97, 0.96, 0.91], "top-5": [0.99, 0.99, 0.98]},
                     "sparsity", "accuracy", "accuracy vs sparsity", tmp_path / "sweep.png")
    assert path == tmp_path / "sweep.png" and path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ConfigError, match="series 'top-1' has 2 points, x has 3"):
        line_plot([1, 2, 3], {"top-1": [0.1, 0.2]}, "x", "y", "t", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    bars = sparsity_bars(layer_summary(hand_made_model()), tmp_path / "sparsity.png")
    assert bars.read_bytes()[:8] == PNG_MAGIC


def test_import_does_not_touch_pyplot_backend():
    import subprocess
    import sys

    code = "import sys, deepshrink.report; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
