"""The lab's experiments, one call each: each point starts from the same checkpoint.

- ``prune-std``: prune every layer at s x std(w), s in 0, 0.25, 0.5, 1.0; retrain; accuracy and sparsity.
- ``prune-percentile``: the same with q = 0, 25, 50, 75 percent per layer.
- ``bits``: k-means weight sharing at 6, 5, 4, 3 bits; accuracy before and after centroid training.
- ``init``: random, density, linear and kmeans++ centroid initialisation at 4 bits.
- ``sensitivity``: one layer alone pruned at increasing q, no retraining (the basis for per-layer q).
- ``rate``: rate-aware quantization (ECSQ, uniform or dependent) at increasing lambda, centroid training, then the
  compressed file: its size on disk against the accuracy of the model decoded from it (the
  size-vs-error frontier).

Each sweep writes ``sweep.md``, ``sweep.csv``, ``sweep.json`` and a plot under its folder; while it runs,
``points.json`` holds the finished points, so the same sweep run again into that folder (same
checkpoint, same settings) continues after them. Accuracies
are measured on the test split (reporting), or with ``split="validation"`` on the checkpoint's
validation split: the one to read when a sweep chooses something (e.g. per-layer q from
``sensitivity``). ``sweep.json`` records which split it was.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn

from . import report, stages
from .checkpoint import load_checkpoint
from .encode import EncodeConfig
from .errors import ConfigError
from .files import atomic_write
from .layers import select_weights
from .prune import PRUNERS, PruneConfig, PruningRule, prune_model
from .quantize import QuantizeConfig, quantize_model
from .stages import StageContext
from .train import TrainConfig, evaluate

log = logging.getLogger(__name__)

STD_VALUES = (0.0, 0.25, 0.5, 1.0)
PERCENTILES = (0.0, 25.0, 50.0, 75.0)
BITS = (6, 5, 4, 3)
INITS = ("random", "density", "linear", "kmeans++")
SENSITIVITY_Q = (25.0, 50.0, 75.0, 90.0)
RATE_LAMBDAS = (0.0, 0.003, 0.01, 0.03, 0.1)


@dataclass
class SweepResult:
    rows: list[dict]
    columns: list[tuple]
    report: Path


def run_sweep(
    kind: str,
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    epochs: int = 1,
    lr: float = 0.01,
    bits: int = 4,
    lambdas: Sequence[float] = RATE_LAMBDAS,
    method: str = "ecsq",
    hessian: bool = False,
    split: str = "test",
    on_point: Callable[[dict], None] | None = None,
    trust_factory: bool = False,
    encode: EncodeConfig | None = None,
    reassign_epochs: int = 0,
    reassign_lr: float = 0.01,
    progress: bool = True,
) -> SweepResult:
    """Run one of the lab's sweeps from ``checkpoint`` (its meta names the dataset).

    Args:
        epochs: retraining epochs per point (pruning sweeps) or centroid-training epochs (bits/init/rate);
            0 skips retraining.
        bits: the bit width of the ``init`` and ``rate`` sweeps.
        trust_factory: build a checkpoint whose model is a ``pkg.module:factory`` (runs that code).
        lambdas, method, hessian: the ``rate`` sweep's points and quantizer (see ``QuantizeConfig``).
        encode: how the ``rate`` sweep writes its files (coder, stored float precision); default ``EncodeConfig()``.
        reassign_epochs, reassign_lr: the ``rate`` sweep's quantization-aware retraining of each point
            (``TrainConfig.reassign_lam`` = the point's lambda) before its centroid training; 0 = none.
        split: "test" (report) or "validation" (choose: needs a checkpoint whose dataset has one).
        progress: a bar per tensor while the ``rate`` sweep's files are written and read (on a terminal).
    """
    spec = _sweeps().get(kind)
    if spec is None:
        raise ConfigError(f"unknown sweep {kind!r}; valid: {sweep_kinds()}")
    if kind == "rate":  # every setting checked before any work
        if not lambdas:
            raise ConfigError("the rate sweep needs at least one lambda")
        rate_configs = [QuantizeConfig(bits=bits, method=method, lam=lam, hessian=hessian) for lam in lambdas]
        reassign = TrainConfig(epochs=reassign_epochs, lr=reassign_lr, weight_decay=0.0, progress=False)
    _, payload = load_checkpoint(checkpoint, trust_factory=trust_factory)
    dataset = dict(payload["meta"].get("dataset") or {})
    if not dataset:
        raise ConfigError(f"{checkpoint}: the checkpoint names no dataset (meta.dataset)")
    ctx = StageContext.for_dataset(dataset, device=device, data_dir=data_dir, trust_factory=trust_factory,
                                   progress=progress)
    eval_data = ctx.split(split)  # the validation split is held out of retraining
    retrain = TrainConfig(epochs=epochs, lr=lr, weight_decay=1e-4 if kind.startswith("prune") else 0.0,
                          schedule="cosine", progress=False)

    def accuracy(model: nn.Module) -> float:
        return evaluate(model, eval_data, device=ctx.device)["accuracy"]

    def retrained(model: nn.Module) -> float | None:
        if epochs <= 0:
            return None
        stages.retrain(model, retrain, ctx)
        return accuracy(model)

    def fresh() -> nn.Module:
        # every point starts from the checkpoint itself: copy.deepcopy would share parametrize's
        # generated classes, so quantizing one copy (which removes a mask parametrization) breaks the rest
        return load_checkpoint(checkpoint, trust_factory=trust_factory)[0]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = spec.points
    if kind == "rate":
        def reassigned(model: nn.Module, lam: float) -> None:
            if reassign.epochs > 0:
                stages.retrain(model, replace(reassign, reassign_lam=lam), ctx)

        points = functools.partial(points, configs=rate_configs, ctx=ctx, reassigned=reassigned, files=out_dir,
                                   spec=payload["model"], dataset=payload["meta"]["dataset"],
                                   encode=encode or EncodeConfig(), split=split)
    # a stopped sweep of the same checkpoint and settings continues after its last finished point
    settings = {"kind": kind, "checkpoint": _sha256(checkpoint), "epochs": epochs, "lr": lr, "bits": bits,
                "split": split}
    if kind == "rate":
        settings.update(lambdas=list(lambdas), method=method, hessian=hessian, reassign_epochs=reassign_epochs,
                        reassign_lr=reassign_lr, encode=asdict(encode or EncodeConfig()))
    progress_file = out_dir / "points.json"
    computations = points(fresh, accuracy, retrained, bits)
    rows = _finished_points(progress_file, settings)[:len(computations)]
    if rows:
        log.info("%s: %d point(s) of this sweep already done, continuing after them", progress_file, len(rows))
    for i, compute in enumerate(computations):
        if i >= len(rows):
            rows.append(compute())
            atomic_write(progress_file, lambda f: f.write(json.dumps({"settings": settings, "rows": rows}).encode()))
        if on_point:
            on_point(rows[i])
    path = write_sweep(out_dir, kind, rows, spec, split)
    progress_file.unlink()
    return SweepResult(rows, spec.columns, path)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished_points(progress_file: Path, settings: dict) -> list[dict]:
    """The rows a stopped run of this same sweep finished (none if it had other settings or no file)."""
    try:
        saved = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return []
    rows = saved.get("rows")
    return rows if isinstance(rows, list) and all(isinstance(row, dict) for row in rows) else []


@dataclass(frozen=True)
class Sweep:
    points: Callable[..., list[Callable[[], dict]]]  # one function per point, computing its row
    columns: list[tuple]
    x: str  # plotted on the x axis
    y: tuple[str, ...]  # plotted as lines
    xlabel: str


def _sparsity(model: nn.Module) -> float:
    return report.summary_totals(report.layer_summary(model))["sparsity"]


def _prune_points(rule: PruningRule):
    param = rule.amount
    values = STD_VALUES if param == "s" else PERCENTILES

    def points(fresh, accuracy, retrained, _bits):
        def point(v):
            model = fresh()
            prune_model(model, PruneConfig(method=rule.name, **{param: v}))
            row = {param: v, "sparsity": _sparsity(model), "accuracy": accuracy(model)}
            row["retrained_accuracy"] = retrained(model)
            return row

        return [functools.partial(point, v) for v in values]

    return points


def _quantize_points(vary: str):
    def points(fresh, accuracy, retrained, bits):
        before = functools.cache(lambda: accuracy(fresh()))  # once, and not at all when every point is done

        def point(v):
            model = fresh()
            config = QuantizeConfig(bits=v, init="linear") if vary == "bits" else QuantizeConfig(bits=bits, init=v)
            quantize_model(model, config)
            return {vary: v, "accuracy_before": before(), "accuracy": accuracy(model),
                    "retrained_accuracy": retrained(model)}

        return [functools.partial(point, v) for v in (BITS if vary == "bits" else INITS)]

    return points


def _sensitivity_points(fresh, accuracy, _retrained, _bits):
    dense = functools.cache(lambda: accuracy(fresh()))

    def point(layer, q):
        model = fresh()
        prune_model(model, PruneConfig(method="percentile", q=q, include=(layer,)))
        acc = accuracy(model)
        return {"layer": layer, "q": q, "accuracy": acc, "drop": dense() - acc}

    layers = [ref.fqn for ref in select_weights(fresh(), kinds=("conv", "fc"))]
    return [functools.partial(point, layer, q) for layer in layers for q in SENSITIVITY_Q]


def _rate_points(fresh, accuracy, retrained, _bits, *, configs, ctx: StageContext, reassigned, files: Path,
                 spec: dict, dataset: dict, encode: EncodeConfig, split: str):
    def point(config: QuantizeConfig) -> dict:
        model = fresh()
        stages.quantize(model, config, ctx)  # Fisher importances (hessian) from training batches only
        row = {"lambda": config.lam, "accuracy": accuracy(model)}
        reassigned(model, config.lam)
        row["retrained_accuracy"] = retrained(model)
        row["sparsity"] = _sparsity(model)  # after retraining: reassignment moves weights to and from zero
        path = files / f"lambda-{config.lam:g}.dsz"
        # the checkpoint's dataset record, so that `deepshrink eval FILE` loads and normalises the data as training did
        meta = {"dataset": dataset, "quantize": {"method": config.method, "lam": config.lam}}
        # the file's model, not the one in memory: float16 storage rounds what it keeps
        measured = stages.compress_and_evaluate(model, path, encode, ctx, model_spec=spec, meta=meta, splits=(split,))
        file_accuracy = measured["decoded_validation_accuracy" if split == "validation" else "decoded_accuracy"]
        row.update(file_bytes=measured["file_bytes"], ratio=measured["ratio"], file_accuracy=file_accuracy)
        return row

    return [functools.partial(point, config) for config in configs]


def _fmt_bytes(value) -> str:
    return f"{value:,}"


_ACC = [("accuracy", "accuracy", report.fmt_percent), ("retrained_accuracy", "after retraining", report.fmt_percent)]
_AMOUNT_LABELS = {"s": "s (threshold = s x std)", "q": "q (percent pruned)"}


def _prune_sweep(rule: PruningRule) -> Sweep:
    p = rule.amount
    return Sweep(_prune_points(rule), [(p, p, None), ("sparsity", "sparsity", report.fmt_percent), *_ACC],
                 p, ("accuracy", "retrained_accuracy"), f"{_AMOUNT_LABELS[p]}, {rule.name} ({rule.scope})")


def _sweeps() -> dict[str, Sweep]:
    """Every sweep by kind: one ``prune-<rule>`` per registered pruning rule, then the fixed ones."""
    return {**{f"prune-{name}": _prune_sweep(rule) for name, rule in PRUNERS.items()}, **SWEEPS}


def sweep_kinds() -> list[str]:
    """The kinds ``run_sweep`` accepts."""
    return list(_sweeps())


SWEEPS: dict[str, Sweep] = {
    "bits": Sweep(_quantize_points("bits"), [("bits", "bits", None), ("accuracy_before", "before", report.fmt_percent), *_ACC],
                  "bits", ("accuracy", "retrained_accuracy"), "bits per weight"),
    "init": Sweep(_quantize_points("init"), [("init", "init", None), ("accuracy_before", "before", report.fmt_percent), *_ACC],
                  "init", ("accuracy", "retrained_accuracy"), "centroid initialisation"),
    "rate": Sweep(_rate_points, [("lambda", "lambda", None), ("sparsity", "sparsity", report.fmt_percent),
                                 ("file_bytes", "file bytes", _fmt_bytes), ("ratio", "ratio", report.fmt_ratio), *_ACC,
                                 ("file_accuracy", "decoded file", report.fmt_percent)],
                  "file_bytes", ("accuracy", "retrained_accuracy", "file_accuracy"), "compressed file (bytes)"),
    "sensitivity": Sweep(_sensitivity_points, [("layer", "layer", None), ("q", "q", None),
                                                ("accuracy", "accuracy", report.fmt_percent), ("drop", "drop", report.fmt_percent)],
                         "q", ("accuracy",), "q (percent of this layer pruned)"),
}


def write_sweep(out_dir: Path, kind: str, rows: list[dict], spec: Sweep, split: str = "test") -> Path:
    """Write the markdown table, CSV, JSON and plot of a sweep; returns the markdown path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out_dir / "sweep.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write(out_dir / "sweep.json", lambda f: f.write(json.dumps({"kind": kind, "split": split, "rows": rows}, indent=2).encode()))
    if kind == "sensitivity":  # one line per layer
        series: dict[str, list] = {}
        for r in rows:
            series.setdefault(r["layer"], []).append(r["accuracy"])
        xs = list(SENSITIVITY_Q)
    else:
        xs = [r[spec.x] for r in rows]
        series = {y: [r[y] for r in rows] for y in spec.y if all(r[y] is not None for r in rows)}
    plot = report.line_plot(xs, series, spec.xlabel, f"{split} accuracy", f"sweep: {kind}", out_dir / "sweep.png")
    text = (f"# Sweep: {kind}\n\nAccuracy on the {split} split.\n\n{report.table_markdown(rows, spec.columns)}\n\n"
            f"![{kind}]({plot.name})\n")
    path = out_dir / "sweep.md"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
