"""Command line: parse arguments into configs, call one library function, print a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from . import report
from .errors import ConfigError, DeepShrinkError

# a fixed width when piped, so tables stay readable in logs instead of wrapping at 80 columns
console = Console(width=None if sys.stdout.isatty() else 140)


# --- shared argument groups -------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", choices=["constant", "step", "cosine"], default="cosine")
    g.add_argument("--step-epochs", type=int, nargs="*", default=[], help="epochs where a step schedule drops the lr")
    g.add_argument("--no-augment", action="store_true", help="disable the dataset's default augmentation")
    g.add_argument("--validation", type=int, metavar="N",
                   help="hold out N training images (fixed seeded choice) as a validation split, evaluated every epoch")
    g.add_argument("--keep-best", action="store_true", help="end with the epoch of best validation accuracy (needs --validation)")
    g.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better validation accuracy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def _train_config(args):
    from .train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, step_epochs=tuple(args.step_epochs), seed=args.seed,
        augment=not args.no_augment, progress=sys.stderr.isatty(), keep_best=args.keep_best, patience=args.patience,
    )


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required, help="digits, mnist, cifar10 or imagefolder (default: the checkpoint's)")
    g.add_argument("--data-dir", help="where the dataset files are (default ./data; for imagefolder the folder with train/ and test/)")


def _dataset_entry(args, meta: dict | None = None) -> dict:
    entry = dict((meta or {}).get("dataset") or {})
    if args.dataset:
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
    out = Path(args.out or f"runs/{recipe.name}")
    _run(recipe, out, args)


def _run(recipe, out, args) -> None:
    from .pipeline import run_recipe

    def on_stage(m):
        console.print(f"  stage {m['stage']} {m['kind']:<9} accuracy {100 * m['accuracy']:.2f}%  "
                      f"sparsity {100 * m['sparsity']:.1f}%  ({m['seconds']:.1f} s)")

    result = run_recipe(recipe, out, data_dir=getattr(args, "data_dir", None), device=getattr(args, "device", None),
                        resume=getattr(args, "resume", False), on_stage=on_stage)
    console.print(report.render_table(result.stages, report.STAGE_COLUMNS, title=f"{recipe.name}: stages"))
    console.print(report.render_table(result.layers + [report.summary_totals(result.layers)], report.LAYER_COLUMNS,
                                      title="per-layer summary (final model)"))
    final = result.stages[-1]
    if final["kind"] == "encode":
        console.print(
            f"[bold]{final['file']}[/]: {final['file_bytes']:,} bytes, {final['ratio']:.1f}x smaller than the dense "
            f"float32 state dict ({final['dense_bytes']:,} bytes); decoded model accuracy "
            f"{100 * final['decoded_accuracy']:.2f}%. The lab's estimate would say {final['lab_estimate_ratio']:.1f}x."
        )
    console.print(f"report: {out / 'report.md'}")


def cmd_train(args) -> None:
    from .checkpoint import save_checkpoint
    from .models import build_model, load_foreign_weights, model_spec
    from .pipeline import resolve_device
    from .train import init_distributed, is_main_process, train

    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON: {e}") from None
    spec = model_spec(args.model, **kwargs)
    model = build_model(spec)
    if args.init_from:
        load_foreign_weights(model, args.init_from)
    dataset = _dataset_entry(args)
    train_data, validation_data, test_data = _load(dataset)
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, device = init_distributed() if args.distributed or under_torchrun else (0, 1, resolve_device(args.device))
    config = _train_config(args)
    result = train(model.to(device), train_data, config, eval_data=test_data, validation_data=validation_data,
                   device=device)
    if is_main_process():
        save_checkpoint(args.out, model.cpu(), spec, {"dataset": dataset, "train": dataclasses.asdict(config),
                                                      "metrics": result.final})
        console.print(f"final: {result.final}\nwrote {args.out}")


def _load(dataset: dict):
    from .pipeline import load_splits

    return load_splits(dataset)  # (train, validation or None, test)


def cmd_eval(args) -> None:
    from .format import MAGIC, load
    from .checkpoint import load_checkpoint
    from .pipeline import resolve_device
    from .train import evaluate

    path = Path(args.path)
    if _starts_with(path, MAGIC):  # a .dsz file; anything else is treated as a checkpoint
        from .format import read_header

        model, meta = load(path), read_header(path).get("meta", {})
        if isinstance(model, dict):
            raise ConfigError(f"{path}: the file holds a user model's weights; evaluate it from Python with deepshrink.load()")
    else:
        model, payload = load_checkpoint(path)
        meta = payload["meta"]
    test_data = _load(_dataset_entry(args, meta)).test
    result = evaluate(model, test_data, device=resolve_device(args.device))
    console.print(f"{path}: accuracy {100 * result['accuracy']:.2f}%  loss {result['loss']:.4f}  (n={result['n']})")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False  # the checkpoint loader reports the missing file


def cmd_summary(args) -> None:
    from .checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    rows = report.layer_summary(model)
    if args.json:
        print(json.dumps({"layers": rows, "total": report.summary_totals(rows)}, indent=2))
    else:
        _print_layers(model, f"{args.checkpoint}")


def cmd_prune(args) -> None:
    from .checkpoint import load_checkpoint
    from .prune import PruneConfig, prune_model

    model, payload = load_checkpoint(args.checkpoint)
    config = PruneConfig(method=args.method, s=args.s, q=args.q, include=tuple(args.include) if args.include else None,
                         exclude=tuple(args.exclude), q_by_pattern=tuple(_pattern_value(v, float) for v in args.q_layer),
                         s_by_pattern=tuple(_pattern_value(v, float) for v in args.s_layer))
    prune_model(model, config)
    _print_layers(model, f"pruned ({args.method})")
    _save(args.out, model, payload, {"prune": dataclasses.asdict(config)})


def cmd_finetune(args) -> None:
    from .checkpoint import load_checkpoint
    from .prune import zero_pruned_

    model, payload = load_checkpoint(args.checkpoint)
    meta = _retrain(model, args, payload["meta"], "finetune")
    zero_pruned_(model)
    _print_layers(model, "after fine-tuning")
    _save(args.out, model, payload, meta)


def _retrain(model, args, meta: dict, label: str) -> dict:
    """Run the training loop on the checkpoint's dataset; returns the meta entries to record."""
    from .pipeline import resolve_device
    from .train import train

    dataset = _dataset_entry(args, meta)
    train_data, validation_data, test_data = _load(dataset)
    device = resolve_device(args.device)
    config = _train_config(args)
    result = train(model.to(device), train_data, config, eval_data=test_data, validation_data=validation_data,
                   device=device)
    model.cpu()
    return {"dataset": dataset, label: dataclasses.asdict(config), "metrics": result.final}


def cmd_quantize(args) -> None:
    from .checkpoint import load_checkpoint
    from .quantize import QuantizeConfig, quantize_model

    model, payload = load_checkpoint(args.checkpoint)
    config = QuantizeConfig(bits=args.bits, bits_conv=args.bits_conv, bits_fc=args.bits_fc, init=args.init,
                            seed=args.seed, bits_by_pattern=tuple(_pattern_value(v, int) for v in args.bits_layer))
    quantize_model(model, config)
    meta = {"quantize": dataclasses.asdict(config)}
    if args.train_centroids:
        meta.update(_retrain(model, args, payload["meta"], "centroid_training"))
    _print_layers(model, f"quantized ({args.bits} bits, {args.init} init)")
    _save(args.out, model, payload, meta)


def cmd_plot(args) -> None:
    from .checkpoint import load_checkpoint

    stages: dict[str, dict] = {}
    for path in args.checkpoints:
        model, payload = load_checkpoint(path)
        path = Path(path)  # a run's stage checkpoints are all checkpoint.pt: name them by their stage folder
        label = path.parent.name if path.stem == "checkpoint" else path.stem
        for fqn, values in report.effective_weights(model).items():
            stages.setdefault(fqn, {})[label] = values
    paths = report.weight_histograms(stages, args.out)
    console.print(f"wrote {len(paths)} histogram(s) to {args.out}")


def cmd_encode(args) -> None:
    from .checkpoint import load_checkpoint
    from .encode import EncodeConfig
    from .format import compress_model

    model, payload = load_checkpoint(args.checkpoint)
    config = EncodeConfig(coder=args.coder, index_bits_conv=args.index_bits_conv, index_bits_fc=args.index_bits_fc,
                          codebook_dtype=args.codebook_dtype, raw_dtype=args.raw_dtype)
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
        console.print(
            f"lab estimate (non-zero fraction x average code length / 32; leaves out positions, codebooks "
            f"and raw tensors): {file_report.lab_estimate_ratio:.1f}x -- an estimate, not a file size"
        )


def cmd_inspect(args) -> None:
    from .format import inspect_file

    file_report = inspect_file(args.file)
    if args.json:
        print(json.dumps(file_report.to_dict(), indent=2))
    else:
        _print_file_report(file_report)


def cmd_decode(args) -> None:
    from .checkpoint import atomic_write
    from .format import read_file

    _, tensors = read_file(args.file)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()})
        atomic_write(out, lambda f: f.write(data))
    else:
        import torch

        atomic_write(out, lambda f: torch.save(tensors, f))
    console.print(f"wrote {out} ({len(tensors)} tensors)")


def cmd_sweep(args) -> None:
    from .sweep import run_sweep

    result = run_sweep(args.kind, args.checkpoint, args.out, data_dir=args.data_dir, device=args.device,
                       epochs=args.epochs, lr=args.lr, split=args.split)
    console.print(report.render_table(result.rows, result.columns, title=f"sweep: {args.kind}"))
    console.print(f"report: {result.report}")


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
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
    _add_data_args(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("summary", help="per-layer sparsity table of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("prune", help="magnitude pruning")
    p.add_argument("checkpoint")
    p.add_argument("--method", choices=["std", "percentile", "global"], default="percentile")
    p.add_argument("--s", type=float, default=0.5, help="std method: prune |w| < s * std(w)")
    p.add_argument("--q", type=float, default=50.0, help="percentile/global: prune the q%% smallest |w|")
    p.add_argument("--q-layer", action="append", default=[], metavar="GLOB=Q", help="per-layer q (repeatable)")
    p.add_argument("--s-layer", action="append", default=[], metavar="GLOB=S", help="per-layer s (repeatable)")
    p.add_argument("--include", nargs="*", help="glob patterns of weight names to prune (default: all conv/fc)")
    p.add_argument("--exclude", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="retrain with masks (and codebooks) held fixed")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_data_args(p)
    _add_train_args(p, epochs=10, lr=0.01)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("quantize", help="k-means weight sharing (optionally train the centroids)")
    p.add_argument("checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--bits-conv", type=int)
    p.add_argument("--bits-fc", type=int)
    p.add_argument("--bits-layer", action="append", default=[], metavar="GLOB=BITS",
                   help="bits for weights whose name matches GLOB (repeatable; first match wins over conv/fc)")
    p.add_argument("--init", choices=["linear", "random", "density", "kmeans++"], default="linear")
    p.add_argument("--train-centroids", action="store_true")
    p.add_argument("--out", required=True)
    _add_data_args(p)
    _add_train_args(p, epochs=5, lr=0.001)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plot", help="weight histograms per layer across checkpoints (e.g. dense, pruned, quantized)")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("encode", help="write the compressed file")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--coder", choices=["huffman", "ans"], default="huffman")
    p.add_argument("--index-bits-conv", type=int, default=8)
    p.add_argument("--index-bits-fc", type=int, default=5)
    p.add_argument("--codebook-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--raw-dtype", choices=["float32", "float16"], default="float32",
                   help="how biases and BatchNorm statistics are stored")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("inspect", help="per-layer accounting of a compressed file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("decode", help="decode a compressed file into a state dict (.pt or .safetensors)")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("sweep", help="the lab's experiments: prune-std, prune-percentile, bits, init, sensitivity")
    p.add_argument("kind", choices=["prune-std", "prune-percentile", "bits", "init", "sensitivity"])
    p.add_argument("checkpoint", help="a trained (dense) checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=1, help="retraining epochs per point (0 = no retraining)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="where accuracy is measured: validation (the checkpoint's, to choose) or test (to report)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except DeepShrinkError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
