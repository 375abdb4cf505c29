"""One training loop for training, masked retraining and centroid fine-tuning.

Compression state rides along inside the model: a ``Masked`` weight's pruned entries are zero on
every forward whatever the optimizer does to its original, and a ``SharedWeights`` weight trains
only its centroids (its original has ``requires_grad=False``), so the loop needs no special cases.
Distributed runs (launched with torchrun) join the process group with ``distributed()``, a context
manager that always tears it down, and pass its group to ``train``, which then wraps the model in
DistributedDataParallel; every rank trains on its own shard of each batch::

    with distributed() as world:
        train(model, data, config, device=world.device, group=world.group)
    end_process(0)  # no gloo thread may outlive the interpreter (it aborts at exit otherwise)
"""

from __future__ import annotations

import gc
import logging
import math
import numbers
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.utils import parametrize

from .layers import resolve, select_weights
from .parametrizations import reassigning
from .config import check_lam, enum_value
from .data import Batches, ImageData
from .errors import ConfigError, DataError, DeepShrinkError
from .files import atomic_write

logger = logging.getLogger(__name__)


class OptimizerName(str, Enum):
    """SGD: momentum SGD as in the paper. ADAM: torch Adam (L2 weight decay added to the gradient)."""

    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, Enum):
    """CONSTANT: fixed lr. STEP: multiply by gamma at each of step_epochs. COSINE: cosine decay to 0."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"


@dataclass(frozen=True)
class TrainConfig:
    """How to train; ``dataclasses.asdict`` of it goes into checkpoint meta."""

    epochs: int = 10  # enough for MNIST models; CIFAR recipes set their own
    batch_size: int = 128  # per process; the global batch under DDP is batch_size * world_size
    optimizer: str = "sgd"  # an OptimizerName value
    lr: float = 0.1  # SGD on BN ResNets; retraining recipes use ~0.01, centroid fine-tuning ~0.001
    momentum: float = 0.9  # standard for SGD; Adam ignores it
    nesterov: bool = False  # plain momentum, as in the paper's Caffe solver
    weight_decay: float = 5e-4  # L2 on every trainable tensor (incl. biases, BN, centroids), like the lab
    schedule: str = "cosine"  # a Schedule value; cosine needs no tuning of drop epochs
    step_epochs: tuple[int, ...] = ()  # epochs (0-based) at whose start the step schedule multiplies by gamma
    gamma: float = 0.1  # the usual 10x drop
    warmup_epochs: float = 0  # linear warmup length; 0 = none
    label_smoothing: float = 0.0  # plain cross-entropy by default
    seed: int = 0  # shuffling and augmentation; the model's initialisation is the caller's
    amp: bool = True  # bf16 (or fp16 + GradScaler) autocast on CUDA; CPU always runs fp32
    augment: bool = True  # the dataset's default augmentation (ImageData.augment)
    log_every: int = 50  # steps between host syncs (.item()) for the progress bar
    progress: bool = True  # rich progress bar (only on rank 0 and a terminal)
    keep_best: bool = False  # end with the weights of the epoch of best validation accuracy (needs validation data)
    patience: int = 0  # stop after this many epochs without a new best validation accuracy; 0 = never stop early
    # knowledge distillation (Hinton et al. 2015) from a teacher passed to train(): the loss is
    # (1 - w) x cross-entropy + w x distillation_loss; w = 0 trains on the labels alone
    distill_weight: float = 0.0
    distill_temperature: float = 4.0  # softens both models' outputs; Hinton et al. used 2-20
    # quantized layers: None trains their shared values, the assignments fixed (the paper's centroid
    # fine-tuning); a number trains their float weights instead, each moving to its cheapest level at
    # every step for this rate weight (quantization-aware retraining, ``parametrizations.reassigning``)
    reassign_lam: float | None = None

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: expected {expected}")

        for name, enum in (("optimizer", OptimizerName), ("schedule", Schedule)):
            try:  # store the plain string so asdict() round-trips through JSON/YAML
                object.__setattr__(self, name, enum_value(enum, getattr(self, name), name))
            except ConfigError:
                fail(name, "one of " + ", ".join(m.value for m in enum))
        try:
            object.__setattr__(self, "step_epochs", tuple(int(s) for s in self.step_epochs))
        except (TypeError, ValueError):
            fail("step_epochs", "a list of epoch numbers")
        ints = {"epochs": 0, "batch_size": 1, "log_every": 1, "seed": 0, "patience": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"an integer >= {low}")
        # types first, so a recipe's "0.1" or null fails naming the field, not inside a comparison
        for name in ("lr", "momentum", "weight_decay", "gamma", "warmup_epochs", "label_smoothing",
                     "distill_weight", "distill_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "a finite number")
        for name in ("nesterov", "amp", "augment", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            fail("lr", "a positive finite number")
        if not 0 <= self.momentum < 1:
            fail("momentum", "a number in [0, 1)")
        if self.nesterov and (self.momentum == 0 or self.optimizer != OptimizerName.SGD.value):
            fail("nesterov", "False unless optimizer is 'sgd' with momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", "a finite number >= 0")
        if not 0 < self.gamma <= 1:
            fail("gamma", "a number in (0, 1]")
        if list(self.step_epochs) != sorted(set(self.step_epochs)) or any(s < 1 for s in self.step_epochs):
            fail("step_epochs", "strictly increasing epoch numbers >= 1")
        if not 0 <= self.warmup_epochs <= max(self.epochs, 0):
            fail("warmup_epochs", f"a number in [0, epochs={self.epochs}]")
        if not 0 <= self.label_smoothing < 1:
            fail("label_smoothing", "a number in [0, 1)")
        if not 0 <= self.distill_weight <= 1:
            fail("distill_weight", "a number in [0, 1]")
        if not self.distill_temperature > 0:
            fail("distill_temperature", "a positive number")
        if self.reassign_lam is not None:
            try:
                check_lam(self.reassign_lam)
            except ConfigError:
                fail("reassign_lam", "null or a finite number >= 0")


@dataclass
class TrainResult:
    """Per-epoch records and the final metrics."""

    history: list[dict] = field(default_factory=list)  # epoch, lr, loss, train_accuracy, validation_*, test_*, seconds
    final: dict = field(default_factory=dict)
    best_epoch: int | None = None  # the epoch of best validation accuracy (None without validation data)
    resumed_seconds: float = 0.0  # the epochs' time before a stop, read back from ``state_file``


def learning_rate(config: TrainConfig, epoch: float, steps_per_epoch: int = 1) -> float:
    """The lr of the step that starts at fractional ``epoch`` (0 <= epoch < config.epochs)."""
    lr = config.lr
    if config.schedule == Schedule.STEP.value:
        lr *= config.gamma ** sum(epoch >= s for s in config.step_epochs)
    elif config.schedule == Schedule.COSINE.value:
        span = max(config.epochs - config.warmup_epochs, 1e-12)
        progress = min(max((epoch - config.warmup_epochs) / span, 0.0), 1.0)
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    if config.warmup_epochs > 0:  # measured at the step's end, so the first step already moves
        lr *= min(1.0, (epoch + 1 / steps_per_epoch) / config.warmup_epochs)
    return lr


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the outputs softened by ``temperature``, averaged over the batch and
    scaled by temperature**2 so that its gradients keep their size as the temperature changes
    (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (see ``distributed()``)."""

    rank: int
    world_size: int
    device: torch.device  # this rank's GPU, or the CPU
    group: dist.ProcessGroup  # pass to ``train(..., group=)``


@contextmanager
def distributed(backend: str | None = None) -> Iterator[World]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK) and always leave it.

    On a normal exit every rank waits at a barrier, then the group is destroyed; when an exception
    leaves the block the barrier is skipped (the other ranks may never reach it). Garbage is collected
    first so DistributedDataParallel's reducers (held in reference cycles) release their gloo work.
    Gloo's worker threads can still outlive ``destroy_process_group``, and their destructors abort the
    interpreter at exit ("terminate called without an active exception"): end worker processes with
    ``end_process`` after the block.

    Args:
        backend: "nccl", "gloo", ...; default NCCL when CUDA is available, else gloo.

    Raises:
        ConfigError: not launched by torchrun (an environment variable is missing), or a group is
            already initialised (it belongs to someone else, who must tear it down).
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise ConfigError(f"distributed run needs {', '.join(missing)} set; launch with `torchrun --nproc_per_node N ...`")
    if dist.is_initialized():
        raise ConfigError("a torch.distributed process group is already initialised; pass its group to train()")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    group = dist.group.WORLD
    completed = False
    try:
        yield World(dist.get_rank(group), dist.get_world_size(group), _default_device(), group)
        completed = True
    finally:
        try:
            gc.collect()
            if completed:
                dist.barrier(group)
        finally:
            dist.destroy_process_group()


def end_process(code: int = 0) -> None:
    """Flush output and end this process at once with ``code`` (``os._exit``), skipping interpreter
    teardown, where threads left by gloo would abort it. For the end of distributed workers only."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when there is a GPU, else the CPU) or a device name, checked.

    Raises:
        ConfigError: CUDA asked for on a machine without it.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0: the process that writes files and logs."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)


def _all_sum(stats: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(stats, group=group)
    return stats


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == OptimizerName.ADAM.value:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
    )


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _evaluate(
    model: nn.Module, data: ImageData, device: torch.device, batch_size: int, group: dist.ProcessGroup | None
) -> dict:
    # with a group: each rank scores data[rank::world] (disjoint, unpadded, unlike Batches' shards) and
    # the sums are all-reduced, so every rank must call it
    rank, world = _world(group)
    if world > 1:
        data = replace(data, images=data.images[rank::world], labels=data.labels[rank::world])
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.no_grad(), parametrize.cached():  # weights are fixed: compute each parametrization once
        for x, y in Batches(data, batch_size, device=device):
            logits = model(x).float()
            stats[0] += F.cross_entropy(logits, y, reduction="sum")
            stats[1] += (logits.argmax(1) == y).sum()
            stats[2] += y.numel()
    model.train(was_training)
    loss, correct, n = _all_sum(stats, group).tolist()
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "n": int(n)}


def eval_batch_size(device: torch.device) -> int:
    """Evaluation batch: large on a GPU; 128 on a CPU, where 1024-image activations fall out of cache and
    a ResNet-20 test pass runs 2.5x slower (measured on 2 cores, 2026-11-29)."""
    return 1024 if device.type == "cuda" else 128


def evaluate(model: nn.Module, data: ImageData, *, device: str | torch.device = "cpu", batch_size: int | None = None) -> dict:
    """Mean cross-entropy and top-1 accuracy of ``model`` (moved to ``device``) on all of ``data``.

    Runs in this process alone, also in a distributed run (so rank 0 may call it by itself).

    Returns:
        {"loss": float, "accuracy": float in [0, 1], "n": number of samples}
    """
    device = torch.device(device)
    return _evaluate(model.to(device), data, device, batch_size or eval_batch_size(device), group=None)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays free for the CLI's tables
        disable=not enabled,
    )


def train(
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    *,
    eval_data: ImageData | None = None,
    validation_data: ImageData | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[dict], None] | None = None,
    group: dist.ProcessGroup | None = None,
    teacher: nn.Module | None = None,
    state_file: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; evaluate on ``validation_data`` and ``eval_data`` after every epoch.

    Only ``validation_data`` steers training (``keep_best``, ``patience``); ``eval_data`` (the test
    split) is reported and never read by any decision.

    Only tensors with ``requires_grad`` are optimised (a quantized layer trains its centroids only,
    or with ``config.reassign_lam`` set its float weights, reassigned to its levels at every step).

    Args:
        callback: called on every rank with each epoch's record (check ``is_main_process()``
            before writing files).
        group: a process group (``distributed().group``) to train in with DistributedDataParallel:
            every rank of it must call this with the same arguments; each trains on its shard and
            the reported metrics are averaged over all ranks. None trains in this process alone.
        teacher: the model whose outputs the student learns from when ``config.distill_weight > 0``
            (e.g. the dense model while its pruned or quantized copy retrains); run in eval mode,
            never updated.
        state_file: after every epoch the loop's whole state (weights, optimizer, history, the best
            epoch's weights) is written here; when the file exists at the start, training continues
            from it and ends where an uninterrupted run would (each epoch's order and augmentation
            are seeded by its number). Its weights replace the model's, so it belongs to one starting
            model: the caller keeps it beside that run's output and deletes it once the result is stored.

    Returns:
        TrainResult with one record per epoch and ``final`` (the last record, or the evaluation
        of the untrained model when ``epochs == 0``).

    Raises:
        ConfigError: the model has no trainable tensor, keep_best/patience without validation_data,
            a teacher without ``distill_weight`` (or the reverse), or a ``state_file`` written with other
            settings or for a model of other shapes.
        DataError: ``data`` is empty.
        DeepShrinkError: the loss became NaN or infinite (lower the learning rate).
    """
    if config.reassign_lam is not None:  # the same loop, over the float weights of the quantized layers
        with reassigning(model, config.reassign_lam):
            return train(model, data, replace(config, reassign_lam=None), eval_data=eval_data,
                         validation_data=validation_data, device=device, callback=callback, group=group,
                         teacher=teacher, state_file=state_file)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # DDP needs an explicit device index
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = _world(group)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (requires_grad=False everywhere)")
    if (config.keep_best or config.patience) and validation_data is None:
        raise ConfigError("TrainConfig.keep_best/patience choose by validation accuracy: pass validation_data "
                          "(in a recipe, give the dataset a 'validation' size)")
    if (teacher is None) != (config.distill_weight == 0):
        raise ConfigError("distillation needs both a teacher and TrainConfig.distill_weight > 0; got "
                          f"{'a' if teacher is not None else 'no'} teacher and distill_weight={config.distill_weight}")
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = _make_optimizer(params, config)
    net: nn.Module = model
    if group is not None:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group
        )
    amp_dtype = _amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # drop a ragged last batch (BatchNorm fails on a batch of 1) unless that would leave no batch
    drop_last = len(data) >= config.batch_size * world
    batches = Batches(
        data, config.batch_size, shuffle=True, augment=config.augment, device=device,
        seed=config.seed, rank=rank, world_size=world, drop_last=drop_last,
    )
    steps = len(batches)
    if steps == 0 and config.epochs > 0:
        raise DataError(f"{data.name}: no training samples")
    result = TrainResult()
    best_accuracy, best_state, first_epoch, stopped = -1.0, None, 0, False
    if state_file is not None and os.path.exists(state_file):
        state = _load_train_state(state_file, config, model, optimizer, scaler)
        result.history, result.best_epoch = state["history"], state["best_epoch"]
        result.resumed_seconds = state["seconds"]
        best_accuracy, best_state, first_epoch, stopped = (state["best_accuracy"], state["best_state"],
                                                            state["epoch"], state["stopped"])
        if rank == 0:
            logger.info("%s: continuing after epoch %d of %d", state_file, first_epoch, config.epochs)
    show = config.progress and rank == 0 and sys.stderr.isatty()
    with _progress_bar(show) as bar:
        for epoch in range(first_epoch, first_epoch if stopped else config.epochs):
            start = time.perf_counter()
            task = bar.add_task("train", total=steps, epoch=f"{epoch + 1}/{config.epochs}", loss=float("nan"), acc=0.0)
            batches.set_epoch(epoch)
            net.train()
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
            lr = config.lr
            for step, (x, y) in enumerate(batches):
                lr = learning_rate(config, epoch + step / steps, steps)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                with parametrize.cached():  # each parametrized weight is computed once per step
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = net(x)
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                    if teacher is not None:
                        if teacher_logits.shape != logits.shape:
                            raise ConfigError(f"the teacher's outputs {tuple(teacher_logits.shape)} do not match the "
                                              f"student's {tuple(logits.shape)}: distillation needs the same classes")
                        w = config.distill_weight
                        loss = (1 - w) * loss + w * distillation_loss(logits, teacher_logits, config.distill_temperature)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                stats[0] += loss.detach() * y.numel()
                stats[1] += (logits.detach().argmax(1) == y).sum()
                stats[2] += y.numel()
                if (step + 1) % config.log_every == 0 and show:  # the only mid-epoch host sync
                    loss_sum, correct, n = stats.tolist()
                    bar.update(task, loss=loss_sum / n, acc=correct / n)
                bar.advance(task)
            loss_sum, correct, n = _all_sum(stats, group).tolist()
            record = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(n, 1), "train_accuracy": correct / max(n, 1)}
            if not math.isfinite(record["loss"]):
                raise DeepShrinkError(f"epoch {epoch + 1}: training loss is {record['loss']}; lower the lr ({config.lr})")
            val = None
            if validation_data is not None:
                val = _evaluate(model, validation_data, device, eval_batch_size(device), group)
                record["validation_accuracy"], record["validation_loss"] = val["accuracy"], val["loss"]
            test = _evaluate(model, eval_data, device, eval_batch_size(device), group) if eval_data is not None else None
            record["test_accuracy"] = test["accuracy"] if test else None
            record["test_loss"] = test["loss"] if test else None
            record["seconds"] = time.perf_counter() - start
            bar.update(task, loss=record["loss"], acc=record["train_accuracy"])
            result.history.append(record)
            if rank == 0:
                val_text = f", validation acc {record['validation_accuracy']:.4f}" if val else ""
                test_text = f", test acc {record['test_accuracy']:.4f}" if test else ""
                logger.info(
                    "epoch %d/%d: lr %.4g, loss %.4f, train acc %.4f%s%s (%.1f s)", epoch + 1, config.epochs,
                    lr, record["loss"], record["train_accuracy"], val_text, test_text, record["seconds"],
                )
            if callback is not None:
                callback(record)
            if val is not None:
                if val["accuracy"] > best_accuracy:
                    best_accuracy, result.best_epoch = val["accuracy"], epoch + 1
                    if config.keep_best:  # a copy on the host: the model keeps training in place
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                elif config.patience and epoch + 1 - result.best_epoch >= config.patience:
                    stopped = True
                    if rank == 0:
                        logger.info("no better validation accuracy for %d epochs: stopping after epoch %d",
                                    config.patience, epoch + 1)
            if state_file is not None and rank == 0:
                state = {"epoch": epoch + 1, "stopped": stopped, "config": _resumable_config(config),
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "history": result.history, "best_epoch": result.best_epoch,
                         "best_accuracy": best_accuracy, "best_state": best_state}
                atomic_write(state_file, lambda f: torch.save(state, f))
            if stopped:
                break
    if best_state is not None and result.best_epoch != len(result.history):
        model.load_state_dict(best_state)
        if rank == 0:
            logger.info("keep_best: restored epoch %d (validation acc %.4f)", result.best_epoch, best_accuracy)
    if result.history:
        result.final = dict(result.history[(result.best_epoch if best_state is not None else len(result.history)) - 1])
    elif eval_data is not None:
        test = _evaluate(model, eval_data, device, eval_batch_size(device), group)
        result.final = {"test_accuracy": test["accuracy"], "test_loss": test["loss"]}
    return result


def _resumable_config(config: TrainConfig) -> dict:
    """The settings a continued run must share with the one that wrote its state (not the display ones)."""
    return {k: v for k, v in asdict(config).items() if k not in ("progress", "log_every")}


def _load_train_state(path: str | os.PathLike, config: TrainConfig, model: nn.Module,
                      optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict:
    """Read ``train``'s ``state_file`` into the model, optimizer and scaler; the rest is returned."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"config", "model", "optimizer", "scaler", "epoch", "stopped", "history", "best_epoch",
                   "best_accuracy", "best_state"} - state.keys()
        if missing:
            raise ConfigError(f"it lacks {sorted(missing)}")
        if state["config"] != _resumable_config(config):
            raise ConfigError("it was written with other training settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        state["seconds"] = sum(float(record["seconds"]) for record in state["history"])  # the time before the stop
    except Exception as e:  # torch.load's and load_state_dict's errors name no file
        raise ConfigError(f"{path}: cannot continue training from this state ({e}); delete it to train "
                          "from the start") from None
    return state


def fisher_diagonal(
    model: nn.Module,
    data,
    *,
    batches: int = 32,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    kinds: tuple[str, ...] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher estimate per selected weight: mean squared minibatch gradient of the loss.

    The importance h_i of Hessian-weighted quantization (Choi et al. 2017, Sec. 3.3): the squared
    gradient approximates the loss's second derivative at a trained minimum. Gradients are those of the
    effective weight (a pruned entry's is reported but never used: quantizing keeps it at zero). The
    model runs in eval mode (BatchNorm statistics untouched) and is left unchanged.

    Args:
        data: an ``ImageData`` (a training split: the test split never chooses anything).
        batches: minibatches averaged (drawn in a seeded shuffled order).

    Returns:
        ``{fqn: float32 tensor shaped like the weight}`` on the CPU.
    """
    if isinstance(batches, bool) or not isinstance(batches, numbers.Integral) or batches < 1:
        raise ConfigError(f"batches must be an integer >= 1, got {batches!r}")
    device = torch.device(device)
    refs = select_weights(model, include, exclude, kinds)
    tensors = {}
    for ref in refs:
        module, name = resolve(model, ref.fqn)
        # the stored tensor: a masked weight's gradient reaches its original through the mask
        tensors[ref.fqn] = (module.parametrizations[name].original if parametrize.is_parametrized(module, name)
                            else getattr(module, name))
    was_training = model.training
    model.to(device).eval()
    sums = {fqn: torch.zeros_like(t, dtype=torch.float32) for fqn, t in tensors.items()}
    flags = {fqn: t.requires_grad for fqn, t in tensors.items()}
    count = 0
    try:
        for t in tensors.values():
            t.requires_grad_(True)
        for x, y in Batches(data, batch_size, shuffle=True, device=device, seed=seed):
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
            for fqn, g in zip(tensors, grads):
                if g is not None:
                    sums[fqn] += g.float().square()
            count += 1
            if count == batches:
                break
    finally:
        for fqn, t in tensors.items():
            t.requires_grad_(flags[fqn])
        model.train(was_training)
    return {fqn: (s / max(count, 1)).cpu() for fqn, s in sums.items()}
