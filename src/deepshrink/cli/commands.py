"""The command line's commands: each parses nothing, calls the library and prints a table."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from .. import report
from ..errors import ConfigError
from .options import (context, dataset_entry, encode_config, file_model, pattern_value, selection, show_progress,
                      teacher_model, train_config, user_model, user_spec)

# a fixed width when piped, so tables stay readable in logs instead of wrapping at 80 columns
console = Console(width=None if sys.stdout.isatty() else 170)
error_console = Console(stderr=True)


def _print_layers(model, title: str) -> None:
    rows = report.layer_summary(model)
    console.print(report.render_table(rows + [report.summary_totals(rows)], report.LAYER_COLUMNS, title=title))


def _save(path, model, payload, meta_update: dict) -> None:
    from ..checkpoint import save_checkpoint

    meta = {**payload.get("meta", {}), **meta_update}
    save_checkpoint(path, model, payload["model"], meta)
    console.print(f"wrote {path}")


# --- commands ---------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    from ..pipeline import load_recipe

    recipe = load_recipe("demo-digits")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deepshrink-demo-"))
    console.print(f"[bold]deepshrink demo[/]: {recipe.name} -> {out}")
    _run(recipe, out, args)


def cmd_run(args) -> None:
    from ..pipeline import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:  # the same recipe with another seed: how a headline's spread is measured
        recipe = dataclasses.replace(recipe, seed=args.seed)
    out = Path(args.out or f"runs/{recipe.name}")
    _run(recipe, out, args)


def _run(recipe, out, args) -> None:
    from ..pipeline import run_recipe

    def on_stage(m):
        validation = f" (validation {100 * m['validation_accuracy']:.2f}%)" if "validation_accuracy" in m else ""
        console.print(f"  stage {m['stage']} {m['kind']:<9} accuracy {100 * m['accuracy']:.2f}%{validation}  "
                      f"sparsity {100 * m['sparsity']:.1f}%  ({m['seconds']:.1f} s)")

    result = run_recipe(recipe, out, data_dir=getattr(args, "data_dir", None), device=getattr(args, "device", None),
                        resume=getattr(args, "resume", False), on_stage=on_stage,
                        trust_factory=getattr(args, "trust_factory", False), progress=show_progress(args))
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
    from ..checkpoint import save_checkpoint
    from ..data import dataset_record
    from ..models import build_model, load_foreign_weights
    from ..stages import retrain
    from ..train import distributed

    spec = user_spec(args)
    model = build_model(spec, trust_factory=True)  # the user named the factory on this command line
    if args.init_from:
        load_foreign_weights(model, args.init_from)
    ctx = context(args)
    dataset = dataset_record(dataset_entry(args), ctx.splits.train)
    config, teacher = train_config(args), teacher_model(args)

    def run(ctx, group=None, rank: int = 0) -> None:
        result = retrain(model, config, ctx, teacher=teacher, report_test=True, group=group)
        if rank == 0:
            save_checkpoint(args.out, model.cpu(), spec, {"dataset": dataset, "train": dataclasses.asdict(config),
                                                          "metrics": result.final})
            console.print(f"final: {result.final}\nwrote {args.out}")

    if is_distributed(args):
        with distributed() as world:
            run(dataclasses.replace(ctx, device=world.device), world.group, world.rank)
    else:
        run(ctx)


def is_distributed(args) -> bool:
    """``train --distributed``, or any command under torchrun with more than one process."""
    return getattr(args, "distributed", False) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def cmd_eval(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..format import MAGIC, open_file
    from ..train import evaluate

    path = Path(args.path)
    if _starts_with(path, MAGIC):  # a .dsz file, read once; anything else is treated as a checkpoint
        file = open_file(path)
        model, meta = file_model(file, args), file.meta
    else:
        model, payload = load_checkpoint(path, trust_factory=args.trust_factory)
        meta = payload["meta"]
    ctx = context(args, meta)
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
    from ..checkpoint import load_checkpoint
    from ..format import MAGIC, open_file

    path = Path(args.checkpoint)
    if _starts_with(path, MAGIC):
        model = file_model(open_file(path), args)
    else:
        model = load_checkpoint(path, trust_factory=args.trust_factory)[0]
    rows = report.layer_summary(model)
    if args.json:
        print(json.dumps({"layers": rows, "total": report.summary_totals(rows)}, indent=2))
    else:
        _print_layers(model, f"{args.checkpoint}")


def cmd_prune(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..prune import PruneConfig, prune_model

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = PruneConfig(method=args.method, s=args.s, q=args.q, **selection(args),
                         q_by_pattern=tuple(pattern_value(v, float) for v in args.q_layer),
                         s_by_pattern=tuple(pattern_value(v, float) for v in args.s_layer),
                         q_by_kind=tuple(pattern_value(v, float) for v in args.q_kind),
                         s_by_kind=tuple(pattern_value(v, float) for v in args.s_kind))
    prune_model(model, config)
    _print_layers(model, f"pruned ({args.method})")
    _save(args.out, model, payload, {"prune": dataclasses.asdict(config)})


def cmd_finetune(args) -> None:
    from ..checkpoint import load_checkpoint

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    meta = _retrain(model, args, payload["meta"], "finetune")
    _print_layers(model, "after fine-tuning")
    _save(args.out, model, payload, meta)


def _retrain(model, args, meta: dict, label: str, ctx=None) -> dict:
    """The retraining step on the checkpoint's dataset; returns the meta entries to record."""
    from ..data import dataset_record
    from ..stages import retrain

    ctx = ctx or context(args, meta)
    config = train_config(args)
    result = retrain(model, config, ctx, teacher=teacher_model(args), report_test=True)
    model.cpu()
    return {"dataset": dataset_record(dataset_entry(args, meta), ctx.splits.train), label: dataclasses.asdict(config),
            "metrics": result.final}


def cmd_quantize(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..quantize import QuantizeConfig
    from ..stages import quantize

    if args.teacher and not args.train_centroids:
        raise ConfigError("--teacher teaches centroid training: add --train-centroids")
    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = QuantizeConfig(bits=args.bits, bits_conv=args.bits_conv, bits_fc=args.bits_fc, init=args.init,
                            seed=args.seed, bits_by_pattern=tuple(pattern_value(v, int) for v in args.bits_layer),
                            bits_by_kind=tuple(pattern_value(v, int) for v in args.bits_kind), **selection(args),
                            method=args.method, lam=args.lam, hessian=args.hessian)
    ctx = context(args, payload["meta"]) if config.hessian or args.train_centroids else None
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
    from ..checkpoint import load_checkpoint

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
    from ..checkpoint import load_checkpoint
    from ..compress import compress_model

    model, payload = load_checkpoint(args.checkpoint, trust_factory=args.trust_factory)
    config = encode_config(args, include=tuple(args.include) if args.include else None, exclude=tuple(args.exclude))
    file_report = compress_model(model, args.out, config, model_spec=payload["model"], meta=payload["meta"],
                                 workers=args.workers, progress=show_progress(args), exhaustive=args.exhaustive)
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
    from ..format import open_file

    file = open_file(args.file)
    file_report = file.report()
    model = file_model(file, args, need_model=False)  # checks that the file fits it
    if args.json:
        print(json.dumps(file_report.to_dict(), indent=2))
    else:
        _print_file_report(file_report)
    if model is not None and not args.json:
        console.print(f"the file fills {type(model).__name__} exactly (names and shapes)")


def cmd_decode(args) -> None:
    from ..files import atomic_write
    from ..format import TIED_KEY, open_file

    file = open_file(args.file)
    model = file_model(file, args, need_model=False)  # checks that the file fits it
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


def cmd_export(args) -> None:
    from ..export import to_onnx

    result = to_onnx(args.file, args.onnx, model=user_model(args), trust_factory=args.trust_factory,
                     input_shape=_int_list(args.input_shape, "--input-shape") if args.input_shape else None,
                     input_dtype=args.input_dtype, opset=args.opset, palettized=args.palettized,
                     verify=not args.no_verify)
    if result.palettized:
        rows = [{"tensor": t.name, "shape": "x".join(map(str, t.shape)), "levels": t.levels,
                 "index": f"uint{t.index_bits}", "float32 bytes": t.dense_bytes, "stored bytes": t.stored_bytes}
                for t in result.palettized]
        console.print(report.render_table(rows, title="palettized weights (indices + codebook)"))
    checked = ("not checked with ONNX Runtime" if result.max_abs_diff is None else
               f"ONNX Runtime matches PyTorch (max abs diff {result.max_abs_diff:.2g})")
    console.print(f"wrote {result.path}: {result.onnx_bytes:,} bytes, opset {result.opset}, input "
                  f"{result.input_dtype} (batch, {', '.join(map(str, result.input_shape))}); {checked}")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None


def cmd_bench_infer(args) -> None:
    from ..runtime.benchmark import BENCH_COLUMNS, benchmark

    result = benchmark(args.file, _int_list(args.batch, "--batch"), repeats=args.repeats, threads=args.threads,
                       input_shape=_int_list(args.input_shape, "--input-shape") if args.input_shape else None)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    console.print(report.render_table(result["rows"], BENCH_COLUMNS, title=f"{args.file}: dense vs sparse runtime, "
                                      f"{result['threads']} threads, median of {result['repeats']} runs (ms)"))


def cmd_sweep(args) -> None:
    from ..sweep import run_sweep

    encode = encode_config(args)
    rate = {"bits": args.bits, "lambdas": tuple(args.lambdas), "method": args.method, "hessian": args.hessian,
            "encode": encode, "reassign_epochs": args.reassign_epochs,
            "reassign_lr": args.reassign_lr} if args.kind == "rate" else {}
    result = run_sweep(args.kind, args.checkpoint, args.out, data_dir=args.data_dir, device=args.device,
                       epochs=args.epochs, lr=args.lr, split=args.split, trust_factory=args.trust_factory,
                       progress=show_progress(args), **rate)
    console.print(report.render_table(result.rows, result.columns, title=f"sweep: {args.kind}"))
    console.print(f"report: {result.report}")
