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

A ``train``/``finetune`` stage may learn from an earlier stage's model as well as from the labels:
``teacher: 1, distill_weight: 0.5`` (knowledge distillation, ``train.distillation_loss``), e.g. the
dense model teaching its pruned or quantized copy.

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
from .checkpoint import load_checkpoint, save_checkpoint
from .compress import compress_model, load
from .config import enum_value
from .data import Augment, ImageData, load_dataset
from .encode import EncodeConfig
from .errors import ConfigError, DataError
from .files import atomic_write, sweep_temp_files
from .models import build_model, load_foreign_weights
from .prune import PruneConfig, prune_model, zero_pruned_
from .quantize import QuantizeConfig, fisher_diagonal, quantize_model
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
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a check that met a value of the wrong type
        raise ConfigError(f"{where}: {e}") from None


#: the config each stage kind builds from its options; "load" takes only a checkpoint path
STAGE_CONFIGS: dict[str, type] = {
    "train": TrainConfig, "finetune": TrainConfig, "prune": PruneConfig, "quantize": QuantizeConfig,
    "encode": EncodeConfig,
}


def stage_config(kind: str, options: dict, where: str, seed: int = 0):
    """The config of one stage (the recipe's seed fills in configs that take one), checked on construction.

    Raises:
        ConfigError: options that are not a mapping, unknown keys, or values the config rejects.
    """
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping of names to values, got {options!r}")
    if kind == "load":
        path = options.get("checkpoint")
        if set(options) != {"checkpoint"} or not isinstance(path, str) or not path:
            raise ConfigError(f"{where}: 'load' takes exactly one option, 'checkpoint' (a path), got {options!r}")
        return None
    cls = STAGE_CONFIGS[kind]
    if "seed" in {f.name for f in dataclasses.fields(cls)}:
        options = {"seed": seed, **options}
    if cls is not TrainConfig:
        return make_config(cls, options, where)
    options = dict(options)
    teacher = options.pop("teacher", None)  # a stage number: Recipe.from_dict checks that it is an earlier one
    config = make_config(cls, options, where)
    if (teacher is None) != (config.distill_weight == 0):
        raise ConfigError(f"{where}: distillation needs both 'teacher' (an earlier stage's number) and "
                          f"'distill_weight' > 0; got teacher={teacher!r}, distill_weight={config.distill_weight}")
    return config


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
        """Check the whole recipe, every stage's options included, before anything runs.

        Raises:
            ConfigError: naming the key or stage and the value that is wrong.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping, got {type(raw).__name__}")
        missing = [k for k in ("model", "dataset", "stages") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        unknown = sorted(set(raw) - {"name", "model", "dataset", "stages", "device", "seed", "description"}, key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{source}: 'seed' must be an integer >= 0, got {seed!r}")
        for key in ("name", "device"):
            if key in raw and not isinstance(raw[key], str):
                raise ConfigError(f"{source}: {key!r} must be a string, got {raw[key]!r}")
        if not isinstance(raw["stages"], list):
            raise ConfigError(f"{source}: 'stages' must be a list, got {type(raw['stages']).__name__}")
        stages = []
        for i, stage in enumerate(raw["stages"]):
            if not (isinstance(stage, dict) and len(stage) == 1):
                raise ConfigError(f"{source}: stage {i + 1} must be a mapping with one key, one of {STAGE_KINDS}")
            ((kind, options),) = stage.items()
            if kind not in STAGE_KINDS:
                raise ConfigError(f"{source}: stage {i + 1} has unknown kind {kind!r}; valid: {STAGE_KINDS}")
            options = {} if options is None else options
            stage_config(kind, options, f"{source}: stage {i + 1} ({kind})", seed)
            teacher = options.get("teacher")
            if teacher is not None and (isinstance(teacher, bool) or not isinstance(teacher, int)
                                        or not 1 <= teacher <= i):
                raise ConfigError(f"{source}: stage {i + 1} ({kind}): 'teacher' must be the number of an earlier "
                                  f"stage (1..{i}), whose model teaches this one; got {teacher!r}")
            if options.get("reassign_lam") is not None and all(k != "quantize" for k, _ in stages):
                raise ConfigError(f"{source}: stage {i + 1} ({kind}): 'reassign_lam' retrains quantized weights; "
                                  "a 'quantize' stage must come before it")
            stages.append((kind, dict(options)))
        model = raw["model"] if isinstance(raw["model"], dict) else {"arch": raw["model"]}
        dataset = raw["dataset"] if isinstance(raw["dataset"], dict) else {"name": raw["dataset"]}
        _check_dataset(dataset, f"{source}: dataset")
        return cls(
            name=raw.get("name", source),
            model=model,
            dataset=dataset,
            stages=stages,
            device=raw.get("device", "auto"),
            seed=seed,
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


#: A recipe is a few lines (the shipped ones are under 2 KB); anything this large is not one.
MAX_RECIPE_BYTES = 64 << 10


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases: a 500-byte file of nested aliases (a
    "billion laughs") expands to gigabytes once anything walks it, and recipes have no use for them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML anchors and aliases (&{event.anchor} / *{event.anchor}) "
                              "are not allowed in recipes")
        return super().compose_node(parent, index)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read a recipe from a YAML file, or a shipped one by name (e.g. ``"demo-digits"``), and check it all.

    Raises:
        ConfigError: no such recipe, a file over ``MAX_RECIPE_BYTES``, invalid YAML, YAML anchors or
            aliases, or any problem ``Recipe.from_dict`` finds (every stage's options are checked).
    """
    path = Path(name_or_path)
    if path.is_file():
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the recipe ({e.strerror or e})") from None
    elif str(name_or_path) in builtin_recipes():
        data = (resources.files("deepshrink") / "recipes" / f"{name_or_path}.yaml").read_bytes()
        source = str(name_or_path)
    else:
        raise ConfigError(f"no recipe file {str(name_or_path)!r} and no shipped recipe of that name; shipped: {builtin_recipes()}")
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few lines of YAML")
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_RecipeLoader)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    return Recipe.from_dict(raw, source)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


DATASET_KEYS = ("name", "root", "train_subset", "test_subset", "validation", "mean", "std", "augment")
RECORD_KEYS = ("image_shape", "num_classes")  # recorded by dataset_record; checked against the loaded data


def _check_dataset(dataset: dict, where: str) -> None:
    unknown = sorted(set(dataset) - set(DATASET_KEYS) - set(RECORD_KEYS), key=str)
    if unknown or not isinstance(dataset.get("name"), str):
        raise ConfigError(f"{where}: needs a 'name' string; unknown option(s) {unknown}; "
                          f"valid: {DATASET_KEYS + RECORD_KEYS}")
    if "augment" in dataset:
        enum_value(Augment, dataset["augment"], f"{where} augment")


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
    validation split leaves), ``mean``/``std`` (normalisation a pretrained model expects, e.g.
    ImageNet statistics), ``augment`` (an ``Augment`` value for the training split, replacing the
    dataset's default) and the ``image_shape``/``num_classes`` of a ``dataset_record``, which the
    loaded data must match.

    Raises:
        ConfigError: unknown keys; DataError: the data does not match the recorded shape or classes.
    """
    _check_dataset(dataset, "dataset")
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
    if "augment" in dataset:
        train_data = dataclasses.replace(train_data, augment=dataset["augment"])
    test_data = load_dataset(dataset["name"], root, "test")
    if dataset.get("test_subset"):
        test_data = test_data.subset(int(dataset["test_subset"]))
    _check_record(dataset, train_data, root)
    return Splits(normalised(train_data), validation, normalised(test_data))


def dataset_record(dataset: dict, data: ImageData) -> dict:
    """What checkpoints and compressed files record about their data: the dataset entry without its
    path (``root`` belongs to one machine), with the image shape, normalisation and class count the
    model saw, so ``eval FILE --data-dir D`` needs no ``--dataset`` and loads the data the same way."""
    record = {k: v for k, v in dataset.items() if k != "root"}
    record.update(image_shape=list(data.image_shape), num_classes=data.num_classes,
                  mean=list(data.mean), std=list(data.std))
    return record


def _check_record(dataset: dict, data: ImageData, root) -> None:
    where = f"dataset {dataset['name']!r}" + (f" in {root}" if root else "")
    shape = dataset.get("image_shape")
    if shape is not None and tuple(shape) != tuple(data.image_shape):
        raise DataError(f"{where}: images are {tuple(data.image_shape)} (C, H, W); the model was trained on "
                        f"{tuple(shape)}")
    classes = dataset.get("num_classes")
    if classes is not None and classes != data.num_classes:
        raise DataError(f"{where}: {data.num_classes} classes; the model was trained on {classes}")


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
    config = stage_config("train", options, f"stage {ctx['label']}", ctx["seed"])
    # no per-epoch test pass: the stage's metrics evaluate once at the end (a full pass costs minutes on CPU)
    # validation after every epoch (when the dataset has one) feeds keep_best/patience; the test split
    # is never passed to the loop, so nothing it holds can steer training
    teacher = None
    if "teacher" in options:  # an earlier stage's model, from its checkpoint (so a resumed run finds it too)
        teacher, _ = load_checkpoint(ctx["stage_checkpoint"](options["teacher"]), trust_factory=ctx["trust_factory"])
    result = train(model, ctx["train"], config, validation_data=ctx["validation"], device=ctx["device"],
                   teacher=teacher)
    zero_pruned_(model)
    details = {"history": result.history, "config": dataclasses.asdict(config)}
    if result.best_epoch is not None:
        details["best_epoch"] = result.best_epoch
    return details


def _stage_load(model, options, ctx) -> dict:
    stage_config("load", options, f"stage {ctx['label']}")
    path = options["checkpoint"]
    load_foreign_weights(model, path)
    return {"checkpoint": str(path)}


def _stage_prune(model, options, ctx) -> dict:
    config = stage_config("prune", options, f"stage {ctx['label']}")
    prune_model(model, config)
    return {"config": dataclasses.asdict(config)}


def _stage_quantize(model, options, ctx) -> dict:
    config = stage_config("quantize", options, f"stage {ctx['label']}", ctx["seed"])
    importance = None
    if config.hessian:  # Fisher importances from the training split (never the test split)
        importance = fisher_diagonal(model, ctx["train"], device=ctx["device"], include=config.include,
                                     exclude=config.exclude, kinds=config.kinds, seed=config.seed)
    layers = quantize_model(model, config, importance)
    return {"config": dataclasses.asdict(config), "layers": layers}


def _stage_encode(model, options, ctx) -> dict:
    config = stage_config("encode", options, f"stage {ctx['label']}")
    path = ctx["stage_dir"] / "model.dsz"
    meta = {"recipe": ctx["recipe"], "dataset": ctx["dataset"]}
    file_report = compress_model(model, path, config, model_spec=ctx["spec"], meta=meta)
    decoded = load(path, trust_factory=ctx["trust_factory"])  # the one decode: the model we report is the file's
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
    trust_factory: bool = False,
) -> RunResult:
    """Run every stage of ``recipe``, writing checkpoints, metrics and ``report.md`` under ``out_dir``.

    Args:
        resume: skip the stages already complete in ``out_dir`` and continue from the last checkpoint;
            temp files of writes a killed run left (``.*.tmp``) are removed first.
        on_stage: called with each stage's metrics as it completes (the CLI prints a row).
        trust_factory: build a recipe model given as ``{"factory": "pkg.module:fn"}`` (runs that code).

    Raises:
        ConfigError: a bad recipe, or ``out_dir`` holds a different recipe's run.
    """
    Recipe.from_dict(recipe.to_dict(), recipe.name)  # every stage checked before any runs (a Recipe built by hand too)
    missing = [o["checkpoint"] for kind, o in recipe.stages if kind == "load" and not Path(o["checkpoint"]).is_file()]
    if missing:
        raise ConfigError(f"{recipe.name}: 'load' stage checkpoint(s) {missing} do not exist")
    out_dir = Path(out_dir)
    dev = resolve_device(device or recipe.device)
    recipe_file = out_dir / "recipe.json"
    if recipe_file.exists():
        previous = _read_json(recipe_file)
        if previous != recipe.to_dict():
            raise ConfigError(f"{out_dir} holds a run of a different recipe; choose another --out")
        if not resume:
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        for tmp in sweep_temp_files(out_dir):  # a killed run's half-written files
            log.info("removed %s, left by an interrupted write", tmp)
    torch.manual_seed(recipe.seed)
    train_data, validation_data, test_data = load_splits(recipe.dataset, data_dir)
    record = dataset_record(recipe.dataset, train_data)
    spec = recipe.model
    model = build_model(spec, trust_factory=trust_factory)  # before writing anything: a bad model leaves no folder
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(recipe_file, lambda f: f.write(json.dumps(recipe.to_dict(), indent=2).encode()))
    result = RunResult(out_dir)
    for i, (kind, options) in enumerate(recipe.stages):
        stage_dir = out_dir / f"{i + 1:02d}-{kind}"
        metrics_file, ckpt_file = stage_dir / "metrics.json", stage_dir / "checkpoint.pt"
        if resume and metrics_file.exists():
            metrics = _read_json(metrics_file)
            result.stages.append(metrics)
            log.info("stage %s already complete, skipped", stage_dir.name)
            continue
        if result.stages:  # always continue from the checkpoint, so a resumed run takes the same path
            previous = out_dir / result.stages[-1]["dir"] / "checkpoint.pt"
            model, _ = load_checkpoint(previous, trust_factory=trust_factory)
        start = time.perf_counter()
        ctx = {
            "train": train_data, "validation": validation_data, "test": test_data, "device": dev,
            "seed": recipe.seed, "spec": spec, "label": f"{i + 1} ({kind})", "stage_dir": stage_dir,
            "recipe": recipe.name, "dataset": record, "trust_factory": trust_factory,
            "stage_checkpoint": lambda n: out_dir / f"{n:02d}-{recipe.stages[n - 1][0]}" / "checkpoint.pt",
        }
        stage_dir.mkdir(parents=True, exist_ok=True)
        model.to(dev)
        details = STAGES[kind](model, options, ctx)
        model.cpu()
        metrics = {"stage": i + 1, "kind": kind, "dir": stage_dir.name, **model_metrics(model, test_data, dev, validation_data)}
        metrics.update({k: v for k, v in details.items() if k not in ("history", "config", "layers")})
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        save_checkpoint(ckpt_file, model, spec, meta={"dataset": record, "stage": metrics})
        _write_json(stage_dir / "details.json", details)
        _write_json(metrics_file, metrics)  # last: marks the stage complete
        result.stages.append(metrics)
        if on_stage:
            on_stage(metrics)
    result.model = model
    result.layers = report.layer_summary(model)
    write_run_report(out_dir, recipe, result, trust_factory=trust_factory)
    return result


def write_run_report(out_dir: Path, recipe: Recipe, result: RunResult, *, trust_factory: bool = False) -> Path:
    """``report.md`` (stage table, per-layer summary, plots) and ``metrics.json`` for a finished run."""
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    report.sparsity_bars(result.layers, plots / "sparsity.png")
    histograms = [p.relative_to(out_dir) for p in _weight_histograms(out_dir, result.stages, plots, trust_factory)]
    lines = [
        f"# {recipe.name}",
        "",
        f"Model `{json.dumps(recipe.model)}`, dataset `{json.dumps(recipe.dataset)}`.",
        "",
        "## Stages",
        "",
        report.table_markdown(result.stages, report.STAGE_COLUMNS),
        "",
        f"Ratios are measured on the file on disk; {report.LAB_ESTIMATE_NOTE}.",
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


def _weight_histograms(out_dir: Path, stages: list[dict], plots: Path, trust_factory: bool) -> list[Path]:
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
        model, _ = load_checkpoint(out_dir / stages[i]["dir"] / "checkpoint.pt", trust_factory=trust_factory)
        for fqn, values in report.effective_weights(model).items():
            weights.setdefault(fqn, {})[label] = values
    return report.weight_histograms(weights, plots) if weights else []


def _read_json(path: Path):
    """A run folder's own JSON file; a damaged one is a ConfigError naming it, not a traceback."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is damaged ({e}); remove the run folder or choose another --out") from None


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
