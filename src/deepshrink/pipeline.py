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
the last complete stage. A training stage also keeps ``train-state.pt`` after every epoch until it
completes, so a resumed run continues inside it after its last finished epoch, to the same result.
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

import torch
import yaml
from torch import nn

from . import report, stages
from .checkpoint import load_checkpoint, save_checkpoint
from .data import check_dataset_record, dataset_record
from .encode import EncodeConfig
from .errors import ConfigError
from .files import atomic_write, sweep_temp_files
from .models import build_model, load_foreign_weights
from .prune import PruneConfig, prune_model
from .quantize import QuantizeConfig
from .stages import StageContext
from .train import TrainConfig

log = logging.getLogger(__name__)

STAGE_KINDS = ("train", "load", "prune", "finetune", "quantize", "encode")
FILE_LOSS_WARNING = 0.01  # an encode stage warns where its file scores this much below the model it stores


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
        check_dataset_record(dataset, f"{source}: dataset")
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


@dataclass
class RunResult:
    out_dir: Path
    stages: list[dict] = field(default_factory=list)  # one metrics dict per stage, in order
    model: nn.Module | None = None
    layers: list[dict] = field(default_factory=list)  # the final per-layer summary


@dataclass(frozen=True)
class RunContext:
    """What a recipe's stage gets besides the model and its options."""

    stage: StageContext
    recipe: Recipe
    out_dir: Path
    index: int  # 0-based number of the stage
    dataset: dict  # the dataset record files and checkpoints carry

    @property
    def label(self) -> str:
        return f"stage {self.index + 1} ({self.recipe.stages[self.index][0]})"

    @property
    def stage_dir(self) -> Path:
        return self.out_dir / stage_folder(self.recipe, self.index)

    @property
    def train_state(self) -> Path:
        """Where a training stage keeps its state after every epoch, until the stage completes."""
        return self.stage_dir / "train-state.pt"

    def checkpoint_of(self, number: int) -> Path:
        """Stage ``number``'s (1-based) checkpoint: a resumed run finds it too."""
        return self.out_dir / stage_folder(self.recipe, number - 1) / "checkpoint.pt"


def stage_folder(recipe: Recipe, index: int) -> str:
    return f"{index + 1:02d}-{recipe.stages[index][0]}"


def _stage_train(model: nn.Module, options: dict, run: RunContext) -> dict:
    config = stage_config("train", options, run.label, run.recipe.seed)
    teacher = None
    if "teacher" in options:  # an earlier stage's model, from its checkpoint
        teacher, _ = load_checkpoint(run.checkpoint_of(options["teacher"]), trust_factory=run.stage.trust_factory)
    # no per-epoch test pass: the stage's metrics evaluate once at the end (a full pass costs minutes on CPU)
    result = stages.retrain(model, config, run.stage, teacher=teacher, state_file=run.train_state)
    details = {"history": result.history, "config": dataclasses.asdict(config)}
    if result.resumed_seconds:
        details["seconds_before_resume"] = result.resumed_seconds
    if result.best_epoch is not None:
        details["best_epoch"] = result.best_epoch
    return details


def _stage_load(model: nn.Module, options: dict, run: RunContext) -> dict:
    stage_config("load", options, run.label)
    load_foreign_weights(model, options["checkpoint"])
    return {"checkpoint": str(options["checkpoint"])}


def _stage_prune(model: nn.Module, options: dict, run: RunContext) -> dict:
    config = stage_config("prune", options, run.label)
    prune_model(model, config)
    return {"config": dataclasses.asdict(config)}


def _stage_quantize(model: nn.Module, options: dict, run: RunContext) -> dict:
    config = stage_config("quantize", options, run.label, run.recipe.seed)
    return {"config": dataclasses.asdict(config), "layers": stages.quantize(model, config, run.stage)}


def _stage_encode(model: nn.Module, options: dict, run: RunContext) -> dict:
    config = stage_config("encode", options, run.label)
    meta = {"recipe": run.recipe.name, "dataset": run.dataset}
    return stages.compress_and_evaluate(model, run.stage_dir / "model.dsz", config, run.stage,
                                        model_spec=run.recipe.model, meta=meta)


STAGES: dict[str, Callable[[nn.Module, dict, RunContext], dict]] = {
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
    progress: bool = True,
) -> RunResult:
    """Run every stage of ``recipe``, writing checkpoints, metrics and ``report.md`` under ``out_dir``.

    Args:
        resume: skip the stages already complete in ``out_dir`` and continue from the last checkpoint;
            temp files of writes a killed run left (``.*.tmp``) are removed first.
        on_stage: called with each stage's metrics as it completes (the CLI prints a row).
        trust_factory: build a recipe model given as ``{"factory": "pkg.module:fn"}`` (runs that code).
        progress: a bar per tensor while an ``encode`` stage writes and reads back its file (on a terminal).

    Raises:
        ConfigError: a bad recipe, or ``out_dir`` holds a different recipe's run.
    """
    Recipe.from_dict(recipe.to_dict(), recipe.name)  # every stage checked before any runs (a Recipe built by hand too)
    missing = [o["checkpoint"] for kind, o in recipe.stages if kind == "load" and not Path(o["checkpoint"]).is_file()]
    if missing:
        raise ConfigError(f"{recipe.name}: 'load' stage checkpoint(s) {missing} do not exist")
    out_dir = Path(out_dir)
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
    ctx = StageContext.for_dataset(recipe.dataset, device=device or recipe.device, data_dir=data_dir,
                                   trust_factory=trust_factory, progress=progress)
    record = dataset_record(recipe.dataset, ctx.splits.train)
    spec = recipe.model
    model = build_model(spec, trust_factory=trust_factory)  # before writing anything: a bad model leaves no folder
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(recipe_file, lambda f: f.write(json.dumps(recipe.to_dict(), indent=2).encode()))
    result = RunResult(out_dir)
    model_is_stale = False  # True while the last stage in `result.stages` was skipped, not run here
    for i, (kind, options) in enumerate(recipe.stages):
        run = RunContext(ctx, recipe, out_dir, i, record)
        metrics_file, ckpt_file = run.stage_dir / "metrics.json", run.stage_dir / "checkpoint.pt"
        if resume and metrics_file.exists():
            metrics = _read_json(metrics_file)
            result.stages.append(metrics)
            log.info("stage %s already complete, skipped", run.stage_dir.name)
            model_is_stale = True
            continue
        if result.stages:  # always continue from the checkpoint, so a resumed run takes the same path
            model = _model_after(result.stages[-1], out_dir, trust_factory)
        start = time.perf_counter()
        run.stage_dir.mkdir(parents=True, exist_ok=True)
        model.to(ctx.device)
        details = STAGES[kind](model, options, run)
        earlier_seconds = details.pop("seconds_before_resume", 0.0)  # a resumed stage's time before the stop
        model.cpu()
        metrics = {"stage": i + 1, "kind": kind, "dir": run.stage_dir.name, **stages.model_metrics(model, ctx)}
        metrics.update({k: v for k, v in details.items() if k not in ("history", "config", "layers")})
        metrics["seconds"] = round(time.perf_counter() - start + earlier_seconds, 2)
        if kind == "encode":
            warn_if_file_loses(metrics, f"{run.label}, {metrics['file']}")
        save_checkpoint(ckpt_file, model, spec, meta={"dataset": record, "stage": metrics})
        _write_json(run.stage_dir / "details.json", details)
        _write_json(metrics_file, metrics)  # last: marks the stage complete
        run.train_state.unlink(missing_ok=True)
        result.stages.append(metrics)
        model_is_stale = False
        if on_stage:
            on_stage(metrics)
    if model_is_stale:  # the last stages were all complete: the final model is the last one's checkpoint
        model = _model_after(result.stages[-1], out_dir, trust_factory)
    result.model = model
    result.layers = report.layer_summary(model)
    write_run_report(out_dir, recipe, result, trust_factory=trust_factory)
    return result


def _model_after(stage: dict, out_dir: Path, trust_factory: bool) -> torch.nn.Module:
    """The model a completed stage left, read back from its checkpoint."""
    model, _ = load_checkpoint(out_dir / stage["dir"] / "checkpoint.pt", trust_factory=trust_factory)
    return model


def warn_if_file_loses(metrics: dict, where: str) -> None:
    """Warn where an encode stage's decoded file scores ``FILE_LOSS_WARNING`` or more below the model it
    stores (on validation where there is a split): lossy storage (float16, ``grid_bits``) cost that much."""
    split, key = ("validation", "validation_accuracy") if "decoded_validation_accuracy" in metrics else ("test", "accuracy")
    before, after = metrics[key], metrics[f"decoded_{key}"]
    if before - after >= FILE_LOSS_WARNING:
        log.warning("%s: the decoded file scores %.2f points below the model it stores (%s accuracy %.2f%% -> "
                    "%.2f%%); its lossy settings (float16 raw_dtype/codebook_dtype, grid_bits) cost that: "
                    "store those tensors exactly to check", where, 100 * (before - after), split, 100 * before, 100 * after)


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
        model = _model_after(stages[i], out_dir, trust_factory)
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
