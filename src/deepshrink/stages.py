"""Each step of the pipeline, once: what the command line, a recipe and a sweep all call.

A step is a function of a model, its config and a ``StageContext`` (the data splits and the device);
the callers differ only in how they get those (arguments, a recipe's YAML, a sweep's grid):

- ``retrain``: the training loop (training, masked retraining, centroid training and
  quantization-aware retraining alike), then every pruned weight set back to exactly zero;
- ``quantize``: weight sharing, with Fisher importances from the training split when asked;
- ``compress_and_evaluate``: the file written, read back, and the model it holds evaluated;
- ``model_metrics``: what a model scores, and how sparse it is.

Pruning is ``prune.prune_model`` itself: it needs no data.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import report
from .compress import compress_model, load
from .data import Splits, load_splits
from .encode import EncodeConfig
from .errors import ConfigError
from .format import CompressedFile
from .prune import zero_pruned_
from .quantize import QuantizeConfig, quantize_model
from .train import TrainConfig, TrainResult, evaluate, fisher_diagonal, resolve_device, train


@dataclass(frozen=True)
class StageContext:
    """What a step needs besides the model and its config. The training split trains, the validation
    split (when the dataset entry holds one out) chooses, the test split only reports."""

    splits: Splits
    device: torch.device
    trust_factory: bool = False  # build models that files or checkpoints name by factory (runs their code)
    progress: bool = True  # a bar per tensor while a file is written or loaded (on a terminal)

    @classmethod
    def for_dataset(cls, dataset: dict, *, device: str | torch.device = "auto", data_dir: str | None = None,
                    trust_factory: bool = False, progress: bool = True) -> StageContext:
        """The splits of a dataset entry (``data.load_splits``) on the resolved device."""
        return cls(load_splits(dataset, data_dir), resolve_device(device), trust_factory, progress)

    def split(self, name: str):
        """The "test" or "validation" split (ConfigError when the dataset holds out none)."""
        if name not in ("test", "validation"):
            raise ConfigError(f"unknown split {name!r}; valid: ['test', 'validation']")
        data = getattr(self.splits, name)
        if data is None:
            raise ConfigError("the dataset holds out no validation split (a dataset entry's 'validation: N')")
        return data


def retrain(model: nn.Module, config: TrainConfig, ctx: StageContext, *, teacher: nn.Module | None = None,
            report_test: bool = False, group=None, state_file: str | os.PathLike | None = None) -> TrainResult:
    """Train ``model`` in place on the training split, then zero every pruned weight exactly.

    The validation split (if any) is evaluated after every epoch and feeds ``keep_best``/``patience``;
    the test split never reaches the loop unless ``report_test`` asks for its accuracy per epoch (a
    report only: nothing is chosen on it). Masks and codebooks ride along in the model, so this one
    step trains, retrains, trains centroids and, with ``config.reassign_lam``, reassigns levels.
    ``state_file`` lets a stopped run continue after its last finished epoch (``train.train``).
    """
    result = train(model.to(ctx.device), ctx.splits.train, config, validation_data=ctx.splits.validation,
                   eval_data=ctx.splits.test if report_test else None, device=ctx.device, teacher=teacher,
                   group=group, state_file=state_file)
    zero_pruned_(model)
    return result


def quantize(model: nn.Module, config: QuantizeConfig, ctx: StageContext | None = None) -> dict[str, dict]:
    """Weight sharing (``quantize.quantize_model``); with ``config.hessian``, weighted by a diagonal Fisher
    estimate from training batches (never the test split).

    Raises:
        ConfigError: ``config.hessian`` without a context to draw training batches from; see ``quantize_model``.
    """
    importance = None
    if config.hessian:
        if ctx is None:
            raise ConfigError("hessian=True needs training data for the Fisher estimate: pass a StageContext")
        importance = fisher_diagonal(model, ctx.splits.train, device=ctx.device, include=config.include,
                                     exclude=config.exclude, kinds=config.kinds, seed=config.seed)
    return quantize_model(model, config, importance)


def model_metrics(model: nn.Module, ctx: StageContext) -> dict[str, Any]:
    """Test accuracy and loss (validation accuracy when there is a split) and the sparsity of the
    compressible weights: what every stage reports."""
    totals = report.summary_totals(report.layer_summary(model))
    result = evaluate(model, ctx.splits.test, device=ctx.device)
    metrics = {"accuracy": result["accuracy"], "loss": result["loss"], "params": totals["params"],
               "nonzero": totals["nonzero"], "sparsity": totals["sparsity"]}
    if ctx.splits.validation is not None:
        metrics["validation_accuracy"] = evaluate(model, ctx.splits.validation, device=ctx.device)["accuracy"]
    return metrics


def _decoded_model(file: str | os.PathLike | CompressedFile, ctx: StageContext, model: nn.Module | None = None
                   ) -> nn.Module:
    decoded = load(file, model=model, trust_factory=ctx.trust_factory, progress=ctx.progress)
    if isinstance(decoded, dict):
        raise ConfigError(f"{getattr(file, 'path', file)}: the file names no model this run may build (none, or a "
                          "factory without trust_factory): pass the model to fill")
    return decoded


def compress_and_evaluate(model: nn.Module, path: str | os.PathLike, config: EncodeConfig, ctx: StageContext, *,
                          model_spec: dict | None, meta: dict | None = None,
                          splits: tuple[str, ...] = ("test", "validation")) -> dict[str, Any]:
    """Write the compressed file, decode it once, and score the decoded model on ``splits`` (validation only
    where the dataset holds one out): the file is what counts (float16 storage and grids round what the
    model in memory holds)."""
    file_report = compress_model(model.cpu(), path, config, model_spec=model_spec, meta=meta, progress=ctx.progress)
    decoded = _decoded_model(path, ctx)
    metrics = {
        "config": dataclasses.asdict(config), "file": str(path), "file_bytes": file_report.file_bytes,
        "dense_bytes": file_report.dense_bytes, "ratio": file_report.ratio,
        "lab_estimate_ratio": file_report.lab_estimate_ratio, "entropy_bound_ratio": file_report.entropy_bound_ratio,
    }
    for split in splits:
        if split == "test" or ctx.splits.validation is not None:
            key = "decoded_accuracy" if split == "test" else "decoded_validation_accuracy"
            metrics[key] = evaluate(decoded, ctx.split(split), device=ctx.device)["accuracy"]
    return metrics
