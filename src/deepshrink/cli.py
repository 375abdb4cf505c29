"""Command line: parse arguments into configs, call one library function, print a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import traceback
from enum import Enum
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from . import report
from .errors import ConfigError, DataError, DeepShrinkError

# a fixed width when piped, so tables stay readable in logs instead of wrapping at 80 columns
console = Console(width=None if sys.stdout.isatty() else 170)


error_console = Console(stderr=True)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, DeepShrinkError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


# --- shared argument groups -------------------------------------------------------------------


def _values(enum) -> list[str]:
    return [m.value for m in enum]


def _add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    from .train import OptimizerName, Schedule, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--optimizer", choices=_values(OptimizerName), default=d.optimizer)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=_values(Schedule), default=d.schedule)
    g.add_argument("--step-epochs", type=int, nargs="*", default=[], help="epochs where a step schedule drops the lr")
    g.add_argument("--no-augment", action="store_true", help="disable the dataset's default augmentation")
    g.add_argument("--validation", type=int, metavar="N",
                   help="hold out N training images (fixed seeded choice) as a validation split, evaluated every epoch")
    g.add_argument("--keep-best", action="store_true", help="end with the epoch of best validation accuracy (needs --validation)")
    g.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better validation accuracy")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--teacher", metavar="CHECKPOINT",
                   help="learn from this model's outputs as well as from the labels (knowledge distillation)")
    g.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the teacher's term in the loss (default 0.5 with --teacher)")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="softens both models' outputs in the teacher's term")


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, step_epochs=tuple(args.step_epochs), seed=args.seed,
        augment=not args.no_augment, progress=sys.stderr.isatty(), keep_best=args.keep_best, patience=args.patience,
        distill_weight=args.distill_weight if args.distill_weight is not None else (0.5 if args.teacher else 0.0),
        distill_temperature=args.distill_temperature, reassign_lam=getattr(args, "reassign_lambda", None),
    )


def _teacher(args):
    """The ``--teacher`` checkpoint's model, or None."""
    if not args.teacher:
        return None
    from .checkpoint import load_checkpoint

    return load_checkpoint(args.teacher, trust_factory=getattr(args, "trust_factory", False))[0]


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-factory", action="store_true",
                   help="build a model named by 'pkg.module:factory' in the file (imports and runs that code; "
                        "only for files you trust)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required, help="digits, mnist, cifar10 or imagefolder (default: the checkpoint's)")
    g.add_argument("--data-dir", help="where the dataset files are (default ./data; for imagefolder the folder with train/ and test/)")


def _dataset_entry(args, meta: dict | None = None) -> dict:
    entry = dict((meta or {}).get("dataset") or {})
    if args.dataset and args.dataset != entry.get("name"):
        entry = {"name": args.dataset}
    if args.data_dir:
        entry["root"] = args.data_dir
    if "name" not in entry:
        raise ConfigError("no dataset known for this checkpoint: pass --dataset (and --data-dir)")
    if getattr(args, "validation", None) is not None:
        entry["validation"] = args.validation
    return entry


def _pattern_value(text: str, cast):
    """'layer1.*=6' -> ('layer1.*', 6)."""
    pattern, sep, value = text.rpartition("=")
    try:
        if not (sep and pattern):
            raise ValueError
        return pattern, cast(value)
    except ValueError:
        raise ConfigError(f"expected GLOB=VALUE, got {text!r}") from None


def _add_selection_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("weight selection")
    g.add_argument("--include", nargs="*", help=f"glob patterns of weight names to {what} (default: every "
                   "floating parameter with >= --min-dims dims)")
    g.add_argument("--exclude", nargs="*", default=[], help=f"glob patterns of weight names not to {what}")
    g.add_argument("--kinds", nargs="*", help="weight kinds to consider: conv fc attention rnn embedding other "
                   "custom (default: all)")
    g.add_argument("--min-dims", type=int, default=2, help="smallest number of dimensions of a compressible weight")


def _selection(args) -> dict:
    return {"include": tuple(args.include) if args.include else None, "exclude": tuple(args.exclude),
            "kinds": tuple(args.kinds) if args.kinds else None, "min_dims": args.min_dims}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model of a compressed file made from a user model")
    g.add_argument("--model", help="build this model and fill it from the file: a built-in name or "
                   "pkg.module:factory (it must be importable)")
    g.add_argument("--model-kwargs", help="JSON dict of keyword arguments for --model")


def _user_spec(args) -> dict | None:
    """The spec ``--model``/``--model-kwargs`` name, or None."""
    from .models import model_spec

    if not getattr(args, "model", None):
        return None
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON: {e}") from None
    return model_spec(args.model, **kwargs)


def _user_model(args):
    """The model ``--model`` names (the user named the factory on this command line: it is trusted), or None."""
    from .models import build_model

    spec = _user_spec(args)
    return None if spec is None else build_model(spec, trust_factory=True)


def _file_model(file, args, need_model: bool = True):
    """The model an opened .dsz file fills: ``--model``, or the file's own spec (a factory only with
    ``--trust-factory``), checked to fit the file. None when no model is asked for and ``need_model`` is False."""
    from .compress import load, model_for

    model = _user_model(args)
    if model is None:
        spec = file.model_spec
        if spec and "factory" in spec and not args.trust_factory:
            if not need_model:
                return None
            raise ConfigError(f"{file.path}: the file was made from the user model {spec['factory']!r}; pass "
                              f"--model {spec['factory']} to build it yourself, or --trust-factory to build the "
                              "factory the file names (this imports and runs its code)")
        if not need_model:
            return model_for(file, trust_factory=args.trust_factory, on_meta=True)  # checks that the file fits it
    model = load(file, model=model, trust_factory=args.trust_factory)
    if isinstance(model, dict):
        raise ConfigError(f"{file.path}: the file names no model; pass --model pkg.module:factory")
    return model


def _context(args, meta: dict | None = None):
    """The data splits and device for a command on a checkpoint or file whose meta records its dataset."""
    from .stages import StageContext

    return StageContext.for_dataset(_dataset_entry(args, meta), device=getattr(args, "device", "auto"),
                                    trust_factory=getattr(args, "trust_factory", False))


def _print_layers(model, title: str) -> None:
    rows = report.layer_summary(model)
    console.print(report.render_table(rows + [report.summary_totals(rows)], report.LAYER_COLUMNS, title=title))


def _save(path, model, payload, meta_update: dict) -> None:
    from .checkpoint import save_checkpoint

    meta = {**payload.get("meta", {}), **meta_update}
    save_checkpoint(path, model, payload["model"], meta)
    console.print(f"wrote {path}")


# --- commands ---------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from .pipeline import load_recipe

    recipe = load_recipe("demo-digits")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deepshrink-demo-"))
    console.print(f"[bold]deepshrink demo[/]: {recipe.name} -> {out}")
    _run(recipe, out, args)


def cmd_run(args) -> None:
    from .pipeline import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:  # the same recipe with another seed: how a headline's spread is measured
        recipe = dataclasses.replace(recipe, seed=args.seed)
    out = Path(args.out or f"runs/{recipe.name}")
    _run(recipe, out, args)


def _run(recipe, out, args) -> None:
    from .pipeline import run_recipe

    def on_stage(m):
        validation = f" (validation {100 * m['validation_accuracy']:.2f}%)" if "validation_accuracy" in m else ""
        console.print(f"  stage {m['stage']} {m['kind']:<9} accuracy {100 * m['accuracy']:.2f}%{validation}  "
                      f"sparsity {100 * m['sparsity']:.1f}%  ({m['seconds']:.1f} s)")

    result = run_recipe(recipe, out, data_dir=getattr(args, "data_dir", None), device=getattr(args, "device", None),
                        resume=getattr(args, "resume", False), on_stage=on_stage,
                        trust_factory=getattr(args, "trust_factory", False))
    console.print(report.render_table(result.stages, report.STAGE_COLUMNS, title=f"{recipe.name}: stages"))
    console.print(report.render_table(result.layers + [report.summary_totals(result.layers)], report.LAYER_COLUMNS,
                                      title="per-layer summary (final model)"))
    final = result.stages[-1]
    if final["kind"] == "encode":
        console.print(
            f"[bold]{final['file']}[/]: {final['file_bytes']:,} bytes, {final['ratio']:.1f}x smaller than the dense "
            f"float32 state dict ({final['dense_bytes']:,} bytes); decoded model accuracy "
            f"{100 * final['decoded_accuracy']:.2f}%. The lab's estimate would say {final['lab_estimate_ratio']:.1f}x "
            "(an estimate, not a file size)."
        )
    console.print(f"report: {out / 'report.md'}")


def cmd_train(args) -> None:
    from .checkpoint import save_checkpoint
    from .data import dataset_record
    from .models import build_model, load_foreign_weights
    from .stages import retrain
    from .train import distributed

    spec = _user_spec(args)
    model = build_model(spec, trust_factory=True)  # the user named the factory on this command line
    if args.init_from:
        load_foreign_weights(model, args.init_from)
    ctx = _context(args)
    dataset = dataset_record(_dataset_entry(args), ctx.splits.train)
    config, teacher = _train_config(args), _teacher(args)

    def run(ctx, group=None, rank: int = 0) -> None:
        result = retrain(model, config, ctx, teacher=teacher, report_test=True, group=group)
        if rank == 0:
            save_checkpoint(args.out, model.cpu(), spec, {"dataset": dataset, "train": dataclasses.asdict(config),
                                                          "metrics": result.final})
            console.print(f"final: {result.final}\nwrote {args.out}")

    if _distributed(args):
        with distributed() as world:
            run(dataclasses.replace(ctx, device=world.device), world.group, world.rank)
    else:
        run(ctx)


def _distributed(args) -> bool:
    """``train --distributed``, or any command under torchrun with more than one process."""
    return getattr(args, "distributed", False) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def cmd_eval(args) -> None:
    from .checkpoint import load_checkpoint
    from .format import MAGIC, open_file
    from .train import evaluate

    path = Path(args.path)
    if _starts_with(path, MAGIC):  # a .dsz file, read once; anything else is treated as a checkpoint
        file = open_file(path)
        model, meta = _file_model(file, args), file.meta
    else:
        model, payload = load_checkpoint(path, trust_factory=args.trust_factory)
        meta = payload["meta"]
    ctx = _context(args, meta)
    result = evaluate(model, ctx.split(args.split), device=ctx.device)
    console.print(f"{path}: {args.split} accuracy {100 * result['accuracy']:.2f}%  loss {result['loss']:.4f}  "
                  f"(n={result['n']})")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False  # the checkpoint loader reports the missing file


def cmd_summary(args) -> None:
    from .checkpoint import load_checkpoint
    from .format import MAGIC, open_file

    path = Path(args.checkpoint)
    if _starts_with(path, MAGIC):
        model = _file_model(open_file(path), args)
    else:
        model = load_checkpoint(path, trust_factory=args.trust_factory)[0]
    rows = report.layer_summary(model)
    if args.json:
        print(json.dumps({"layers": rows, "total": report.summary_totals(rows)}, indent=2))
    else:
        _print_layers(model, f"{args.checkpoint}")


def cmd_prune(args) -> None:
    from .checkpoint import load_checkpoint
    from .prune import PruneConfig, prune_model

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = PruneConfig(method=args.method, s=args.s, q=args.q, **_selection(args),
                         q_by_pattern=tuple(_pattern_value(v, float) for v in args.q_layer),
                         s_by_pattern=tuple(_pattern_value(v, float) for v in args.s_layer),
                         q_by_kind=tuple(_pattern_value(v, float) for v in args.q_kind),
                         s_by_kind=tuple(_pattern_value(v, float) for v in args.s_kind))
    prune_model(model, config)
    _print_layers(model, f"pruned ({args.method})")
    _save(args.out, model, payload, {"prune": dataclasses.asdict(config)})


def cmd_finetune(args) -> None:
    from .checkpoint import load_checkpoint

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    meta = _retrain(model, args, payload["meta"], "finetune")
    _print_layers(model, "after fine-tuning")
    _save(args.out, model, payload, meta)


def _retrain(model, args, meta: dict, label: str, ctx=None) -> dict:
    """The retraining step on the checkpoint's dataset; returns the meta entries to record."""
    from .data import dataset_record
    from .stages import retrain

    ctx = ctx or _context(args, meta)
    config = _train_config(args)
    result = retrain(model, config, ctx, teacher=_teacher(args), report_test=True)
    model.cpu()
    return {"dataset": dataset_record(_dataset_entry(args, meta), ctx.splits.train), label: dataclasses.asdict(config),
            "metrics": result.final}


def cmd_quantize(args) -> None:
    from .checkpoint import load_checkpoint
    from .quantize import QuantizeConfig
    from .stages import quantize

    if args.teacher and not args.train_centroids:
        raise ConfigError("--teacher teaches centroid training: add --train-centroids")
    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = QuantizeConfig(bits=args.bits, bits_conv=args.bits_conv, bits_fc=args.bits_fc, init=args.init,
                            seed=args.seed, bits_by_pattern=tuple(_pattern_value(v, int) for v in args.bits_layer),
                            bits_by_kind=tuple(_pattern_value(v, int) for v in args.bits_kind), **_selection(args),
                            method=args.method, lam=args.lam, hessian=args.hessian)
    ctx = _context(args, payload["meta"]) if config.hessian or args.train_centroids else None
    layers = quantize(model, config, ctx)
    meta = {"quantize": dataclasses.asdict(config)}
    if args.train_centroids:
        meta.update(_retrain(model, args, payload["meta"], "centroid_training", ctx))
    rate = "" if config.method == "kmeans" else f", lambda {config.lam:g}{', Fisher-weighted' if config.hessian else ''}"
    zeroed = sum(info["zeroed"] for info in layers.values())
    _print_layers(model, f"quantized ({args.bits} bits, {config.method}, {args.init} init{rate}; "
                         f"{zeroed:,} weights sent to zero)")
    _save(args.out, model, payload, meta)


def cmd_plot(args) -> None:
    from .checkpoint import load_checkpoint

    stages: dict[str, dict] = {}
    for path in args.checkpoints:
        model, payload = load_checkpoint(path, trust_factory=args.trust_factory)
        path = Path(path)  # a run's stage checkpoints are all checkpoint.pt: name them by their stage folder
        label = path.parent.name if path.stem == "checkpoint" else path.stem
        for fqn, values in report.effective_weights(model).items():
            stages.setdefault(fqn, {})[label] = values
    paths = report.weight_histograms(stages, args.out)
    console.print(f"wrote {len(paths)} histogram(s) to {args.out}")


def cmd_encode(args) -> None:
    from .checkpoint import load_checkpoint
    from .compress import compress_model

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = _encode_config(args, include=tuple(args.include) if args.include else None, exclude=tuple(args.exclude))
    file_report = compress_model(model, args.out, config, model_spec=payload["model"], meta=payload["meta"])
    _print_file_report(file_report)


def _print_file_report(file_report) -> None:
    console.print(report.render_table(file_report.rows, report.FILE_COLUMNS, title=str(file_report.path)))
    console.print(
        f"file {file_report.file_bytes:,} bytes; dense float32 state dict {file_report.dense_bytes:,} bytes; "
        f"[bold]ratio {file_report.ratio:.1f}x[/] ({100 / file_report.ratio:.2f}% of fp32); "
        f"entropy bound {file_report.entropy_bound_ratio:.1f}x"
    )
    if file_report.lab_estimate_ratio:
        console.print(f"lab estimate {file_report.lab_estimate_ratio:.1f}x ({report.LAB_ESTIMATE_NOTE})")


def cmd_inspect(args) -> None:
    from .format import open_file

    file = open_file(args.file)
    file_report = file.report()
    model = _file_model(file, args, need_model=False)  # checks that the file fits it
    if args.json:
        print(json.dumps(file_report.to_dict(), indent=2))
    else:
        _print_file_report(file_report)
    if model is not None and not args.json:
        console.print(f"the file fills {type(model).__name__} exactly (names and shapes)")


def cmd_decode(args) -> None:
    from .files import atomic_write
    from .format import TIED_KEY, open_file

    file = open_file(args.file)
    model = _file_model(file, args, need_model=False)  # checks that the file fits it
    tensors = file.decode_all()
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        # safetensors refuses shared tensors: tied ones are stored once, named in the metadata
        metadata = {TIED_KEY: json.dumps(file.tied, sort_keys=True)} if file.tied else None
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        atomic_write(out, lambda f: f.write(data))
        if file.tied:
            console.print(f"tied weights stored once: {', '.join(f'{a} = {b}' for a, b in file.tied.items())}")
    else:
        import torch

        tensors = file.with_aliases(tensors)
        if model is not None:  # a state dict the model's own load_state_dict takes (its keys, its order)
            tensors = {name: tensors[name] for name in model.state_dict()}
        atomic_write(out, lambda f: torch.save(tensors, f))
    console.print(f"wrote {out} ({len(tensors)} tensors)")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None


def cmd_bench_infer(args) -> None:
    from .runtime.benchmark import BENCH_COLUMNS, benchmark

    result = benchmark(args.file, _int_list(args.batch, "--batch"), repeats=args.repeats, threads=args.threads,
                       input_shape=_int_list(args.input_shape, "--input-shape") if args.input_shape else None)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    console.print(report.render_table(result["rows"], BENCH_COLUMNS, title=f"{args.file}: dense vs sparse runtime, "
                                      f"{result['threads']} threads, median of {result['repeats']} runs (ms)"))


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    encode = _encode_config(args)
    rate = {"bits": args.bits, "lambdas": tuple(args.lambdas), "method": args.method, "hessian": args.hessian,
            "encode": encode, "reassign_epochs": args.reassign_epochs,
            "reassign_lr": args.reassign_lr} if args.kind == "rate" else {}
    result = run_sweep(args.kind, args.checkpoint, args.out, data_dir=args.data_dir, device=args.device,
                       epochs=args.epochs, lr=args.lr, split=args.split, trust_factory=args.trust_factory, **rate)
    console.print(report.render_table(result.rows, result.columns, title=f"sweep: {args.kind}"))
    console.print(f"report: {result.report}")


# --- parser -----------------------------------------------------------------------------------

FOLD_BATCHNORM_HELP = ("store BatchNorm as scale and shift (same eval-mode outputs; running statistics reset, "
                       "so fine-tuning the loaded model is not the same)")


def _add_encode_args(g) -> None:
    """``--coder`` and every registered codec's options (``TensorCodec.options``: ``EncodeConfig`` fields)."""
    from .codecs import CODECS, tensor_coders
    from .encode import EncodeConfig

    g.add_argument("--coder", choices=tensor_coders(), default=EncodeConfig().coder,
                   help="a weight codec's coder (huffman/ans: the paper's layout; cabac: one context-coded stream "
                        "of levels), or auto: the smallest per layer")
    fields = {f.name: f for f in dataclasses.fields(EncodeConfig)}
    added = set()
    for codec in CODECS.values():
        for name, text in codec.options.items():
            if name in added:
                continue
            added.add(name)
            default = fields[name].default
            if isinstance(default, Enum):
                g.add_argument(f"--{name.replace('_', '-')}", choices=[m.value for m in type(default)],
                               default=default.value, help=text)
            else:  # the codecs' other options are integers (bits), None meaning off
                g.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=text)
    g.add_argument("--fold-batchnorm", action="store_true", help=FOLD_BATCHNORM_HELP)


def _encode_config(args, **selection):
    """The ``EncodeConfig`` of ``_add_encode_args``'s options."""
    from .codecs import CODECS
    from .encode import EncodeConfig

    options = {name: getattr(args, name) for codec in CODECS.values() for name in codec.options}
    return EncodeConfig(coder=args.coder, fold_batchnorm=args.fold_batchnorm, **options, **selection)


def build_parser() -> argparse.ArgumentParser:
    from .kmeans import CentroidInit
    from .prune import PRUNERS, PruneConfig
    from .quantize import QuantizeConfig
    from .quantizers import QuantizeMethod
    from .sweep import sweep_kinds

    prune_defaults, quantize_defaults = PruneConfig(), QuantizeConfig()
    parser = argparse.ArgumentParser(prog="deepshrink", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only (no per-epoch lines)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, prune, retrain, quantize and encode an MLP on scikit-learn's digits")
    p.add_argument("--out", help="run folder (default: a new temporary folder)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a recipe (YAML file or shipped name)")
    p.add_argument("recipe")
    p.add_argument("--out", help="run folder (default runs/<recipe name>)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue after the last completed stage")
    p.add_argument("--seed", type=int, default=None,
                   help="replace the recipe's seed (shuffling, augmentation, initialisation; the validation split "
                        "stays the same)")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a model from scratch (or from weights) and save a checkpoint")
    p.add_argument("--model", required=True, help="built-in architecture (mlp, lenet300, lenet5, resnet20...) or pkg.module:factory")
    p.add_argument("--model-kwargs", help="JSON dict of keyword arguments for the model factory")
    p.add_argument("--init-from", help="start from these weights (a torch state dict or checkpoint)")
    p.add_argument("--distributed", action="store_true", help="run under torchrun with DistributedDataParallel")
    p.add_argument("--out", required=True)
    _add_data_args(p, required=True)
    _add_train_args(p, epochs=30, lr=0.1)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint or a compressed file")
    p.add_argument("path")
    _add_trust_arg(p)
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test (to report) or the validation split the file's dataset holds out (to choose)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("summary", help="per-layer sparsity table of a checkpoint or a compressed file")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    _add_trust_arg(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("prune", help="magnitude pruning")
    p.add_argument("checkpoint")
    p.add_argument("--method", choices=list(PRUNERS), default=prune_defaults.method)
    p.add_argument("--s", type=float, default=prune_defaults.s, help="std method: prune |w| < s * std(w)")
    p.add_argument("--q", type=float, default=prune_defaults.q, help="percentile/global: prune the q%% smallest |w|")
    p.add_argument("--q-layer", action="append", default=[], metavar="GLOB=Q", help="per-layer q (repeatable)")
    p.add_argument("--s-layer", action="append", default=[], metavar="GLOB=S", help="per-layer s (repeatable)")
    p.add_argument("--q-kind", action="append", default=[], metavar="KIND=Q",
                   help="q for one weight kind, e.g. attention=60 (repeatable; --q-layer wins)")
    p.add_argument("--s-kind", action="append", default=[], metavar="KIND=S", help="s for one weight kind (repeatable)")
    _add_selection_args(p, "prune")
    _add_trust_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="retrain with masks (and codebooks) held fixed")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_data_args(p)
    _add_train_args(p, epochs=10, lr=0.01)
    p.add_argument("--reassign-lambda", type=float, metavar="LAMBDA",
                   help="quantized model: train the float weights instead of the centroids, each moving to its "
                        "cheapest level (error + LAMBDA x bits) at every step; the quantizer's lambda is the usual choice")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("quantize", help="weight sharing: k-means, entropy-constrained, uniform or dependent "
                       "(optionally train the centroids)")
    p.add_argument("checkpoint")
    p.add_argument("--method", choices=_values(QuantizeMethod), default=quantize_defaults.method,
                   help="kmeans: the paper's; ecsq/uniform/dq: levels chosen for error + lambda x code length "
                        "(dq: dependent, trellis-coded quantization, NNC's design)")
    p.add_argument("--lambda", dest="lam", type=float, default=quantize_defaults.lam,
                   help="ecsq/uniform/dq: bits traded per unit of relative squared error (0 = distortion only)")
    p.add_argument("--hessian", action="store_true",
                   help="ecsq/uniform/dq: weight the error by a diagonal Fisher estimate from training batches")
    p.add_argument("--bits", type=int, default=quantize_defaults.bits)
    p.add_argument("--bits-conv", type=int)
    p.add_argument("--bits-fc", type=int)
    p.add_argument("--bits-layer", action="append", default=[], metavar="GLOB=BITS",
                   help="bits for weights whose name matches GLOB (repeatable; first match wins over kinds)")
    p.add_argument("--bits-kind", action="append", default=[], metavar="KIND=BITS",
                   help="bits for one weight kind, e.g. attention=6 (repeatable; wins over --bits-conv/--bits-fc)")
    _add_selection_args(p, "quantize")
    p.add_argument("--init", choices=_values(CentroidInit), default=quantize_defaults.init)
    p.add_argument("--train-centroids", action="store_true")
    p.add_argument("--out", required=True)
    _add_data_args(p)
    _add_train_args(p, epochs=5, lr=0.001)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plot", help="weight histograms per layer across checkpoints (e.g. dense, pruned, quantized)")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("encode", help="write the compressed file")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_encode_args(p)
    p.add_argument("--include", nargs="*", help="quantized weights to entropy code (default: all)")
    p.add_argument("--exclude", nargs="*", default=[], help="quantized weights to store raw instead")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("inspect", help="per-layer accounting of a compressed file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    _add_trust_arg(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("decode", help="decode a compressed file into a state dict (.pt or .safetensors)")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    _add_trust_arg(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("bench-infer", help="dense vs sparse-runtime latency and weight memory, per layer and end to end")
    p.add_argument("file")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--threads", type=int, help="torch/numba threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per measurement; the median is reported")
    p.add_argument("--input-shape", help="one sample's shape, e.g. 3,32,32 (default: the first Linear's inputs)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_bench_infer)

    p = sub.add_parser("sweep", help=f"the lab's experiments: {', '.join(sweep_kinds())}")
    p.add_argument("kind", choices=sweep_kinds())
    p.add_argument("checkpoint", help="a trained (dense) checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=1, help="retraining epochs per point (0 = no retraining)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="where accuracy is measured: validation (the checkpoint's, to choose) or test (to report)")
    _add_trust_arg(p)
    g = p.add_argument_group("rate sweep (file size vs accuracy)")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1])
    g.add_argument("--method", choices=[m for m in _values(QuantizeMethod) if m != "kmeans"], default="ecsq")
    g.add_argument("--bits", type=int, default=6, help="levels per layer at lambda 0: 2^bits")
    g.add_argument("--hessian", action="store_true", help="Fisher-weighted error (from training batches)")
    _add_encode_args(g)
    g.add_argument("--reassign-epochs", type=int, default=0,
                   help="quantization-aware retraining per point before the centroids train (the point's lambda)")
    g.add_argument("--reassign-lr", type=float, default=0.01, help="its learning rate (cosine schedule)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    code = _call(args)
    if _distributed(args) and "RANK" in os.environ:  # a torchrun worker: gloo threads may outlive the group
        from .train import end_process

        end_process(code)
    return code


def _call(args) -> int:
    try:
        args.func(args)
    except (DeepShrinkError, OSError) as e:  # bad input or a failing disk: one line, the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        message = _one_line(e)
        if isinstance(e, DataError) and hasattr(args, "data_dir") and not args.data_dir:
            # checkpoints and files record which dataset, not where it is on this machine
            message += " (no --data-dir given: pass the dataset's folder)"
        error_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return 2 if isinstance(e, DeepShrinkError) else 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
