"""Recipes: a model, a dataset and a list of stages, run in order with a checkpoint after each stage.

A recipe is a YAML (or dict) like::

    name: demo-digits
    model: {arch: mlp}
    dataset: {name: digits}
    stages:
      - train: {epochs: 30, lr: 0.1}
      - prune: {method: percentile, q: 90}
      - finetune: {epochs: 20, lr: 0.01}
      - quantize: {bits: 4, init: linear}
      - finetune: {epochs: 10, lr: 0.001, weight_decay: 0}   # trains the centroids
      - encode: {coder: huffman}

Stage ``i`` writes ``DIR/NN-kind/checkpoint.pt`` and then ``DIR/NN-kind/metrics.json``; the metrics
file is written last, so its presence marks the stage complete and ``resume=True`` restarts after
the last complete stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import report
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .data import ImageData, load_dataset
from .errors import ConfigError
from .encode import EncodeConfig
from .format import compress_model, inspect_file, load
from .models import build_model, load_foreign_weights
from .prune import PruneConfig, prune_model, zero_pruned_
from .quantize import QuantizeConfig, quantize_model
from .train import TrainConfig, evaluate, train

log = logging.getLogger(__name__)

STAGE_KINDS = ("train", "load", "prune", "finetune", "quantize", "encode")


def make_config(cls: type, options: dict | None, where: str):
    """Build a frozen config dataclass from a plain dict, converting lists to tuples.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones) or a bad value.
    """
    options = dict(options or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if isinstance(value, list) and "tuple" in str(hints[key]):
            options[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class Recipe:
    name: str
    model: dict
    dataset: dict
    stages: list[tuple[str, dict]]
    device: str = "auto"
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict, source: str = "recipe") -> "Recipe":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping, got {type(raw).__name__}")
        missing = [k for k in ("model", "dataset", "stages") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        unknown = sorted(set(raw) - {"name", "model", "dataset", "stages", "device", "seed", "description"})
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}")
        stages = []
        for i, stage in enumerate(raw["stages"]):
            if not (isinstance(stage, dict) and len(stage) == 1):
                raise ConfigError(f"{source}: stage {i + 1} must be a mapping with one key, one of {STAGE_KINDS}")
            ((kind, options),) = stage.items()
            if kind not in STAGE_KINDS:
                raise ConfigError(f"{source}: stage {i + 1} has unknown kind {kind!r}; valid: {STAGE_KINDS}")
            stages.append((kind, dict(options or {})))
        model = raw["model"] if isinstance(raw["model"], dict) else {"arch": raw["model"]}
        dataset = raw["dataset"] if isinstance(raw["dataset"], dict) else {"name": raw["dataset"]}
        return cls(
            name=raw.get("name", source),
            model=model,
            dataset=dataset,
            stages=stages,
            device=raw.get("device", "auto"),
            seed=int(raw.get("seed", 0)),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "dataset": self.dataset,
            "device": self.device,
            "seed": self.seed,
            "stages": [{kind: options} for kind, options in self.stages],
        }


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in ``deepshrink/recipes``."""
    folder = resources.files("deepshrink") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe from a YAML file, or a shipped one by name (e.g. ``"demo-digits"``)."""
    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path)
    elif str(name_or_path) in builtin_recipes():
        text = (resources.files("deepshrink") / "recipes" / f"{name_or_path}.yaml").read_text()
        source = str(name_or_path)
    else:
        raise ConfigError(f"no recipe file {str(name_or_path)!r} and no shipped recipe of that name; shipped: {builtin_recipes()}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    return Recipe.from_dict(raw, source)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


DATASET_KEYS = ("name", "root", "train_subset", "test_subset", "validation", "mean", "std")
VALIDATION_SEED = 0  # fixed: every run and sweep of a dataset entry holds out the same images


class Splits(typing.NamedTuple):
    """A dataset entry's splits. ``validation`` (None unless the entry asks for one) is carved from the
    training split and never overlaps ``train``; anything that chooses reads it, ``test`` only reports."""

    train: ImageData
    validation: ImageData | None
    test: ImageData


def load_splits(dataset: dict, data_dir: str | Path | None = None) -> Splits:
    """(train, validation, test) for a recipe's dataset entry.

    Keys: ``name``; optional ``root``, ``validation`` (N: the last N images of a fixed seeded
    permutation of the training split are held out for validation and removed from training),
    ``train_subset``/``test_subset`` (sizes, for quick runs; ``train_subset`` draws from what the
    validation split leaves) and ``mean``/``std`` (normalisation a pretrained model expects, e.g.
    ImageNet statistics).
    """
    unknown = sorted(set(dataset) - set(DATASET_KEYS))
    if unknown or "name" not in dataset:
        raise ConfigError(f"dataset: needs 'name'; unknown option(s) {unknown}; valid: {DATASET_KEYS}")
    root = data_dir if data_dir is not None else dataset.get("root")

    def normalised(data: ImageData) -> ImageData:
        if "mean" in dataset or "std" in dataset:
            data = dataclasses.replace(data, mean=tuple(dataset.get("mean", data.mean)), std=tuple(dataset.get("std", data.std)))
        return data

    train_data = load_dataset(dataset["name"], root, "train")
    validation = None
    n_validation = dataset.get("validation")
    if n_validation:
        if not isinstance(n_validation, int) or isinstance(n_validation, bool):
            raise ConfigError(f"dataset: 'validation' must be a number of images, got {n_validation!r}")
        train_data, validation = train_data.hold_out(n_validation, seed=VALIDATION_SEED)
        validation = normalised(validation)
    if dataset.get("train_subset"):
        train_data = train_data.subset(int(dataset["train_subset"]))
    test_data = load_dataset(dataset["name"], root, "test")
    if dataset.get("test_subset"):
        test_data = test_data.subset(int(dataset["test_subset"]))
    return Splits(normalised(train_data), validation, normalised(test_data))


def model_metrics(model: nn.Module, test_data: ImageData, device: torch.device,
                  validation_data: ImageData | None = None) -> dict[str, Any]:
    """Accuracy (test, and validation when there is one) and sparsity of the compressible weights:
    what every stage reports."""
    rows = report.layer_summary(model)
    totals = report.summary_totals(rows)
    result = evaluate(model, test_data, device=device)
    metrics = {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "params": totals["params"],
        "nonzero": totals["nonzero"],
        "sparsity": totals["sparsity"],
    }
    if validation_data is not None:
        metrics["validation_accuracy"] = evaluate(model, validation_data, device=device)["accuracy"]
    return metrics


@dataclass
class RunResult:
    out_dir: Path
    stages: list[dict] = field(default_factory=list)  # one metrics dict per stage, in order
    model: nn.Module | None = None
    layers: list[dict] = field(default_factory=list)  # the final per-layer summary


StageFn = Callable[..., dict]


def _stage_train(model, options, ctx) -> dict:
    config = make_config(TrainConfig, {"seed": ctx["seed"], **options}, f"stage {ctx['label']}")
    # no per-epoch test pass: the stage's metrics evaluate once at the end (a full pass costs minutes on CPU)
    # validation after every epoch (when the dataset has one) feeds keep_best/patience; the test split
    # is never passed to the loop, so nothing it holds can steer training
    result = train(model, ctx["train"], config, validation_data=ctx["validation"], device=ctx["device"])
    zero_pruned_(model)
    details = {"history": result.history, "config": dataclasses.asdict(config)}
    if result.best_epoch is not None:
        details["best_epoch"] = result.best_epoch
    return details


def _stage_load(model, options, ctx) -> dict:
    path = options.get("checkpoint")
    if not path:
        raise ConfigError(f"stage {ctx['label']}: 'load' needs a 'checkpoint' path")
    load_foreign_weights(model, path)
    return {"checkpoint": str(path)}


def _stage_prune(model, options, ctx) -> dict:
    config = make_config(PruneConfig, options, f"stage {ctx['label']}")
    prune_model(model, config)
    return {"config": dataclasses.asdict(config)}


def _stage_quantize(model, options, ctx) -> dict:
    config = make_config(QuantizeConfig, {"seed": ctx["seed"], **options}, f"stage {ctx['label']}")
    layers = quantize_model(model, config)
    return {"config": dataclasses.asdict(config), "layers": layers}


def _stage_encode(model, options, ctx) -> dict:
    config = make_config(EncodeConfig, options, f"stage {ctx['label']}")
    path = ctx["stage_dir"] / "model.dsz"
    compress_model(model, path, config, model_spec=ctx["spec"], meta={"recipe": ctx["recipe"]})
    file_report = inspect_file(path)
    decoded = load(path)
    decoded_eval = model_metrics(decoded, ctx["test"], ctx["device"], ctx["validation"])
    return {
        "config": dataclasses.asdict(config),
        "file": str(path),
        "file_bytes": file_report.file_bytes,
        "dense_bytes": file_report.dense_bytes,
        "ratio": file_report.ratio,
        "lab_estimate_ratio": file_report.lab_estimate_ratio,
        "entropy_bound_ratio": file_report.entropy_bound_ratio,
        "decoded_accuracy": decoded_eval["accuracy"],
        **({"decoded_validation_accuracy": decoded_eval["validation_accuracy"]} if ctx["validation"] is not None else {}),
    }


STAGES: dict[str, StageFn] = {
    "train": _stage_train,
    "finetune": _stage_train,  # the same loop: masks and codebooks ride along in the model
    "load": _stage_load,
    "prune": _stage_prune,
    "quantize": _stage_quantize,
    "encode": _stage_encode,
}


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    on_stage: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run every stage of ``recipe``, writing checkpoints, metrics and ``report.md`` under ``out_dir``.

    Args:
        resume: skip the stages already complete in ``out_dir`` and continue from the last checkpoint.
        on_stage: called with each stage's metrics as it completes (the CLI prints a row).

    Raises:
        ConfigError: a bad recipe, or ``out_dir`` holds a different recipe's run.
    """
    out_dir = Path(out_dir)
    dev = resolve_device(device or recipe.device)
    recipe_file = out_dir / "recipe.json"
    if recipe_file.exists():
        previous = json.loads(recipe_file.read_text())
        if previous != recipe.to_dict():
            raise ConfigError(f"{out_dir} holds a run of a different recipe; choose another --out")
        if not resume:
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(recipe_file, lambda f: f.write(json.dumps(recipe.to_dict(), indent=2).encode()))

    torch.manual_seed(recipe.seed)
    train_data, validation_data, test_data = load_splits(recipe.dataset, data_dir)
    spec = recipe.model
    model = build_model(spec)
    result = RunResult(out_dir)
    for i, (kind, options) in enumerate(recipe.stages):
        stage_dir = out_dir / f"{i + 1:02d}-{kind}"
        metrics_file, ckpt_file = stage_dir / "metrics.json", stage_dir / "checkpoint.pt"
        if resume and metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            result.stages.append(metrics)
            log.info("stage %s already complete, skipped", stage_dir.name)
            continue
        if result.stages:  # always continue from the checkpoint, so a resumed run takes the same path
            model, _ = load_checkpoint(out_dir / result.stages[-1]["dir"] / "checkpoint.pt")
        start = time.perf_counter()
        ctx = {
            "train": train_data, "validation": validation_data, "test": test_data, "device": dev, "seed": recipe.seed, "spec": spec,
            "label": f"{i + 1} ({kind})", "stage_dir": stage_dir, "recipe": recipe.name,
        }
        stage_dir.mkdir(parents=True, exist_ok=True)
        model.to(dev)
        details = STAGES[kind](model, options, ctx)
        model.cpu()
        metrics = {"stage": i + 1, "kind": kind, "dir": stage_dir.name, **model_metrics(model, test_data, dev, validation_data)}
        metrics.update({k: v for k, v in details.items() if k not in ("history", "config", "layers")})
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        save_checkpoint(ckpt_file, model, spec, meta={"dataset": recipe.dataset, "stage": metrics})
        _write_json(stage_dir / "details.json", details)
        _write_json(metrics_file, metrics)  # last: marks the stage complete
        result.stages.append(metrics)
        if on_stage:
            on_stage(metrics)
    result.model = model
    result.layers = report.layer_summary(model)
    write_run_report(out_dir, recipe, result)
    return result


def write_run_report(out_dir: Path, recipe: Recipe, result: RunResult) -> Path:
    """``report.md`` (stage table, per-layer summary, plots) and ``metrics.json`` for a finished run."""
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    report.sparsity_bars(result.layers, plots / "sparsity.png")
    histograms = [p.relative_to(out_dir) for p in _weight_histograms(out_dir, result.stages, plots)]
    lines = [
        f"# {recipe.name}",
        "",
        f"Model `{json.dumps(recipe.model)}`, dataset `{json.dumps(recipe.dataset)}`.",
        "",
        "## Stages",
        "",
        report.table_markdown(result.stages, report.STAGE_COLUMNS),
        "",
        "## Layers (final model)",
        "",
        report.table_markdown(result.layers, report.LAYER_COLUMNS),
        "",
        "![per-layer sparsity](plots/sparsity.png)",
        "",
        "## Weight histograms",
        "",
        *(f"![{p.stem}]({p.as_posix()})" for p in histograms),
        "",
    ]
    path = out_dir / "report.md"
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    _write_json(out_dir / "metrics.json", {"recipe": recipe.to_dict(), "stages": result.stages, "layers": result.layers})
    return path


def _weight_histograms(out_dir: Path, stages: list[dict], plots: Path) -> list[Path]:
    """Per-layer histograms of the weights before pruning, after pruning and after quantization."""
    kinds = [s["kind"] for s in stages]
    picks: dict[str, int] = {}  # label -> index of the stage whose checkpoint shows it
    if "prune" in kinds and kinds.index("prune") > 0:
        picks["before pruning"] = kinds.index("prune") - 1
    if "quantize" in kinds:
        if "prune" in kinds and kinds.index("prune") < kinds.index("quantize"):
            picks["after pruning"] = kinds.index("quantize") - 1
        picks["after quantization"] = len(stages) - 1
    elif "prune" in kinds:
        picks["after pruning"] = len(stages) - 1
    weights: dict[str, dict] = {}
    for label, i in picks.items():
        model, _ = load_checkpoint(out_dir / stages[i]["dir"] / "checkpoint.pt")
        for fqn, values in report.effective_weights(model).items():
            weights.setdefault(fqn, {})[label] = values
    return report.weight_histograms(weights, plots) if weights else []


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=_json_default).encode()))


def _json_default(obj):
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
