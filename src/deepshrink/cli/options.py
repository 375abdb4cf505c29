"""The command line's shared options, and how each becomes a config, a model or a data context."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from enum import Enum

from ..errors import ConfigError


# --- shared argument groups -------------------------------------------------------------------


def values(enum) -> list[str]:
    return [m.value for m in enum]


def add_train_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    from ..train import OptimizerName, Schedule, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--optimizer", choices=values(OptimizerName), default=d.optimizer)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=values(Schedule), default=d.schedule)
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


def train_config(args):
    from ..train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, step_epochs=tuple(args.step_epochs), seed=args.seed,
        augment=not args.no_augment, progress=sys.stderr.isatty() and show_progress(args), keep_best=args.keep_best,
        patience=args.patience,
        distill_weight=args.distill_weight if args.distill_weight is not None else (0.5 if args.teacher else 0.0),
        distill_temperature=args.distill_temperature, reassign_lam=getattr(args, "reassign_lambda", None),
    )


def teacher_model(args):
    """The ``--teacher`` checkpoint's model, or None."""
    if not args.teacher:
        return None
    from ..checkpoint import load_checkpoint

    return load_checkpoint(args.teacher, trust_factory=getattr(args, "trust_factory", False))[0]


def add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-factory", action="store_true",
                   help="build a model named by 'pkg.module:factory' in the file (imports and runs that code; "
                        "only for files you trust)")


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=required, help="digits, mnist, cifar10 or imagefolder (default: the checkpoint's)")
    g.add_argument("--data-dir", help="where the dataset files are (default ./data; for imagefolder the folder with train/ and test/)")


def dataset_entry(args, meta: dict | None = None) -> dict:
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


def pattern_value(text: str, cast):
    """'layer1.*=6' -> ('layer1.*', 6)."""
    pattern, sep, value = text.rpartition("=")
    try:
        if not (sep and pattern):
            raise ValueError
        return pattern, cast(value)
    except ValueError:
        raise ConfigError(f"expected GLOB=VALUE, got {text!r}") from None


def add_selection_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("weight selection")
    g.add_argument("--include", nargs="*", help=f"glob patterns of weight names to {what} (default: every "
                   "floating parameter with >= --min-dims dims)")
    g.add_argument("--exclude", nargs="*", default=[], help=f"glob patterns of weight names not to {what}")
    g.add_argument("--kinds", nargs="*", help="weight kinds to consider: conv fc attention rnn embedding other "
                   "custom (default: all)")
    g.add_argument("--min-dims", type=int, default=2, help="smallest number of dimensions of a compressible weight")


def selection(args) -> dict:
    return {"include": tuple(args.include) if args.include else None, "exclude": tuple(args.exclude),
            "kinds": tuple(args.kinds) if args.kinds else None, "min_dims": args.min_dims}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model of a compressed file made from a user model")
    g.add_argument("--model", help="build this model and fill it from the file: a built-in name or "
                   "pkg.module:factory (it must be importable)")
    g.add_argument("--model-kwargs", help="JSON dict of keyword arguments for --model")


def user_spec(args) -> dict | None:
    """The spec ``--model``/``--model-kwargs`` name, or None."""
    from ..models import model_spec

    if not getattr(args, "model", None):
        return None
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-kwargs is not valid JSON: {e}") from None
    return model_spec(args.model, **kwargs)


def user_model(args):
    """The model ``--model`` names (the user named the factory on this command line: it is trusted), or None."""
    from ..models import build_model

    spec = user_spec(args)
    return None if spec is None else build_model(spec, trust_factory=True)


def file_model(file, args, need_model: bool = True):
    """The model an opened .dsz file fills: ``--model``, or the file's own spec (a factory only with
    ``--trust-factory``), checked to fit the file. None when no model is asked for and ``need_model`` is False."""
    from ..compress import load, model_for

    model = user_model(args)
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
    model = load(file, model=model, trust_factory=args.trust_factory, progress=show_progress(args))
    if isinstance(model, dict):
        raise ConfigError(f"{file.path}: the file names no model; pass --model pkg.module:factory")
    return model


def context(args, meta: dict | None = None):
    """The data splits and device for a command on a checkpoint or file whose meta records its dataset."""
    from ..stages import StageContext

    return StageContext.for_dataset(dataset_entry(args, meta), device=getattr(args, "device", "auto"),
                                    trust_factory=getattr(args, "trust_factory", False), progress=show_progress(args))


def show_progress(args) -> bool:
    """Progress bars (training's, and a bar per tensor while files are written or loaded), unless ``--quiet``."""
    return not getattr(args, "quiet", False)


FOLD_BATCHNORM_HELP = ("store BatchNorm as scale and shift (same eval-mode outputs; running statistics reset, "
                       "so fine-tuning the loaded model is not the same)")


def add_encode_args(g) -> None:
    """``--coder`` and every registered codec's options (``TensorCodec.options``: ``EncodeConfig`` fields)."""
    from ..codecs import codec_options, tensor_coders
    from ..encode import EncodeConfig

    g.add_argument("--coder", choices=tensor_coders(), default=EncodeConfig().coder,
                   help="a weight codec's coder (huffman/ans: the paper's layout; cabac: one context-coded stream "
                        "of levels), or auto: the smallest per layer")
    defaults = {f.name: f.default for f in dataclasses.fields(EncodeConfig)}
    for name, text in codec_options().items():
        flag, default = f"--{name.replace('_', '-')}", defaults[name]
        if isinstance(default, Enum):
            g.add_argument(flag, choices=[m.value for m in type(default)], default=default.value, help=text)
        else:  # the codecs' other options are integers (bits), None meaning off
            g.add_argument(flag, type=int, default=default, help=text)
    g.add_argument("--fold-batchnorm", action="store_true", help=FOLD_BATCHNORM_HELP)


def encode_config(args, **selection):
    """The ``EncodeConfig`` of ``add_encode_args``'s options."""
    from ..codecs import codec_options
    from ..encode import EncodeConfig

    options = {name: getattr(args, name) for name in codec_options()}
    return EncodeConfig(coder=args.coder, fold_batchnorm=args.fold_batchnorm, **options, **selection)
