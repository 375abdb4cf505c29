"""Command line: parse arguments into configs, call one library function, print a table.

``options.py`` holds the options several commands share and how they become configs; ``commands.py``
the commands; this module the parser and the entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback

from rich.markup import escape

from ..errors import DataError, DeepShrinkError
from .commands import (cmd_bench_infer, cmd_decode, cmd_demo, cmd_encode, cmd_eval, cmd_export, cmd_finetune, cmd_inspect, cmd_plot,
                       cmd_prune, cmd_quantize, cmd_run, cmd_summary, cmd_sweep, cmd_train, console, error_console,
                       is_distributed)
from .options import (add_data_args, add_encode_args, add_model_args, add_selection_args, add_train_args,
                      add_trust_arg, values)


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, DeepShrinkError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    from ..export import DEFAULT_OPSET, INPUT_DTYPES, UINT4_OPSET
    from ..kmeans import CentroidInit
    from ..prune import PRUNERS, PruneConfig
    from ..quantize import QuantizeConfig
    from ..quantizers import QuantizeMethod
    from ..sweep import sweep_kinds

    prune_defaults, quantize_defaults = PruneConfig(), QuantizeConfig()
    parser = argparse.ArgumentParser(prog="deepshrink", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log warnings only (no per-epoch lines, no progress bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train, prune, retrain, quantize and encode an MLP on scikit-learn's digits")
    p.add_argument("--out", help="run folder (default: a new temporary folder)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a recipe (YAML file or shipped name)")
    p.add_argument("recipe")
    p.add_argument("--out", help="run folder (default runs/<recipe name>)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue a stopped run after its last finished epoch")
    p.add_argument("--seed", type=int, default=None,
                   help="replace the recipe's seed (shuffling, augmentation, initialisation; the validation split "
                        "stays the same)")
    add_trust_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train a model from scratch (or from weights) and save a checkpoint")
    p.add_argument("--model", required=True, help="built-in architecture (mlp, lenet300, lenet5, resnet20...) or pkg.module:factory")
    p.add_argument("--model-kwargs", help="JSON dict of keyword arguments for the model factory")
    p.add_argument("--init-from", help="start from these weights (a torch state dict or checkpoint)")
    p.add_argument("--distributed", action="store_true", help="run under torchrun with DistributedDataParallel")
    p.add_argument("--out", required=True)
    add_data_args(p, required=True)
    add_train_args(p, epochs=30, lr=0.1)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint or a compressed file")
    p.add_argument("path")
    add_trust_arg(p)
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="test (to report) or the validation split the file's dataset holds out (to choose)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("summary", help="per-layer sparsity table of a checkpoint or a compressed file")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    add_trust_arg(p)
    add_model_args(p)
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
    add_selection_args(p, "prune")
    add_trust_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("finetune", help="retrain with masks (and codebooks) held fixed")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    add_data_args(p)
    add_train_args(p, epochs=10, lr=0.01)
    p.add_argument("--reassign-lambda", type=float, metavar="LAMBDA",
                   help="quantized model: train the float weights instead of the centroids, each moving to its "
                        "cheapest level (error + LAMBDA x bits) at every step; the quantizer's lambda is the usual choice")
    add_trust_arg(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("quantize", help="weight sharing: k-means, entropy-constrained, uniform or dependent "
                       "(optionally train the centroids)")
    p.add_argument("checkpoint")
    p.add_argument("--method", choices=values(QuantizeMethod), default=quantize_defaults.method,
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
    add_selection_args(p, "quantize")
    p.add_argument("--init", choices=values(CentroidInit), default=quantize_defaults.init)
    p.add_argument("--train-centroids", action="store_true")
    p.add_argument("--out", required=True)
    add_data_args(p)
    add_train_args(p, epochs=5, lr=0.001)
    add_trust_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plot", help="weight histograms per layer across checkpoints (e.g. dense, pruned, quantized)")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True)
    add_trust_arg(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("encode", help="write the compressed file")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    add_encode_args(p)
    p.add_argument("--include", nargs="*", help="quantized weights to entropy code (default: all)")
    p.add_argument("--exclude", nargs="*", default=[], help="quantized weights to store raw instead")
    p.add_argument("--workers", type=int, help="tensors encoded at once (threads; default: one per CPU)")
    p.add_argument("--exhaustive", action="store_true",
                   help="encode every codec in full on every tensor, also where estimates show it cannot be the smallest")
    add_trust_arg(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("inspect", help="per-layer accounting of a compressed file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    add_trust_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("decode", help="decode a compressed file into a state dict (.pt or .safetensors)")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    add_trust_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("export", help="write the decoded model as an ONNX graph, dense or palettized "
                       "(each shared weight as indices into its codebook), checked with ONNX Runtime")
    p.add_argument("file")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the graph")
    p.add_argument("--input-shape", help="one sample's shape, e.g. 3,32,32, or the sequence length for token ids "
                   "(default: the file's dataset record)")
    p.add_argument("--input-dtype", choices=INPUT_DTYPES,
                   help="input type (default: int64 token ids for Hugging Face models, else float32)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET}, palettized {UINT4_OPSET}: weights of "
                   "<= 16 levels packed as uint4, which needs ONNX Runtime >= 1.23; pass 18 for older runtimes)")
    p.add_argument("--palettized", action="store_true",
                   help="store each shared weight as codebook indices plus its codebook (Cast + Gather in the graph)")
    p.add_argument("--no-verify", action="store_true", help="skip running the graph with ONNX Runtime")
    add_trust_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--out", required=True, help="its folder; the same sweep run again into it continues after "
                                                "the points it finished")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=1, help="retraining epochs per point (0 = no retraining)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="where accuracy is measured: validation (the checkpoint's, to choose) or test (to report)")
    add_trust_arg(p)
    g = p.add_argument_group("rate sweep (file size vs accuracy)")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1])
    g.add_argument("--method", choices=[m for m in values(QuantizeMethod) if m != "kmeans"], default="ecsq")
    g.add_argument("--bits", type=int, default=6, help="levels per layer at lambda 0: 2^bits")
    g.add_argument("--hessian", action="store_true", help="Fisher-weighted error (from training batches)")
    add_encode_args(g)
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
    if is_distributed(args) and "RANK" in os.environ:  # a torchrun worker: gloo threads may outlive the group
        from ..train import end_process

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
