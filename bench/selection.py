"""What the weight selection is worth on a small vision transformer: the old conv/fc-only selection vs
the default (every floating parameter with >= 2 dims), same pruning and bits.

Usage: ``python bench/selection.py``. Prints a table and writes bench/results/selection.json.

The model: a 4x4 patch Conv2d (1 -> 64 channels), a learned (49, 64) position parameter, a 4-layer
``nn.TransformerEncoder`` (d=64, 4 heads, feed-forward 128) and a Linear head: 138,762 parameters,
random init (seed 0). Each selection is pruned to 80% (per weight, percentile) and quantized to 4
bits, then written with Huffman coding; the ratio is dense float32 state dict bytes / file bytes.
Random weights say nothing about accuracy: this measures only what each selection leaves raw.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from deepshrink.compress import compress_model
from deepshrink.prune import PruneConfig, prune_model
from deepshrink.quantize import QuantizeConfig, quantize_model


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 64, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(49, 64) * 0.02)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, 10)
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2) + self.pos).mean(1))


def main() -> None:
    rows = []
    for label, kinds in (("conv+fc only (before)", ("conv", "fc")), ("default selection", None)):
        torch.manual_seed(0)
        model = TinyViT()
        prune_model(model, PruneConfig(q=80, kinds=kinds))
        quantize_model(model, QuantizeConfig(bits=4, kinds=kinds))
        with tempfile.TemporaryDirectory() as d:
            report = compress_model(model, Path(d) / "m.dsz")
        rows.append({"selection": label, "file_bytes": report.file_bytes, "dense_bytes": report.dense_bytes,
                     "ratio": round(report.ratio, 2), "coded_tensors": report.totals["coded_tensors"]})
    print(f"{'selection':24s} {'coded':>6s} {'file bytes':>11s} {'dense bytes':>12s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['selection']:24s} {r['coded_tensors']:6d} {r['file_bytes']:11,d} {r['dense_bytes']:12,d} "
              f"{r['ratio']:6.1f}x")
    print(f"default / before: {rows[1]['ratio'] / rows[0]['ratio']:.1f}x")
    out = Path(__file__).parent / "results" / "selection.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
