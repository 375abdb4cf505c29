"""A 2-process DDP training run for tests/test_train.py (launched with torch.distributed.run).

Usage: python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py OUTDIR

Each rank trains with PER_RANK_BATCH samples per step; rank 0 alone writes OUTDIR/result.pt. The
test runs ``run(world_size=1)`` in-process with a batch of PER_RANK_BATCH * 2 and compares: Batches
gives rank r the strided shard order[r::2] of the same seeded order, so both runs see the same
samples in every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from deepshrink.parametrizations import Masked
from deepshrink.data import ImageData
from deepshrink.models import build_model
from deepshrink.train import TrainConfig, distributed, end_process, seed_everything, train

PER_RANK_BATCH = 8
SAMPLES = 64  # 4 steps per epoch with a global batch of 16


def make_data(n: int = SAMPLES, seed: int = 0) -> ImageData:
    """Learnable synthetic 1x4x4 images: the label is the brightest quadrant."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    quadrants = images.float().view(n, 2, 2, 2, 2).sum((2, 4)).flatten(1)  # (n, 4)
    labels = quadrants.argmax(1)
    return ImageData(images, labels, ("a", "b", "c", "d"), (0.5,), (0.25,), "synthetic")


def make_model() -> torch.nn.Module:
    """A tiny MLP with half of fc1 pruned (so DDP also carries a Masked parametrization)."""
    seed_everything(0)
    model = build_model({"arch": "mlp", "kwargs": {"num_classes": 4, "image_size": 4, "hidden": [12]}})
    weight = model.fc1.weight.detach()
    parametrize.register_parametrization(model.fc1, "weight", Masked(weight.abs() > weight.abs().median()))
    return model


def run(world_size: int, group=None) -> dict:
    """Train the tiny model; batch size per process is chosen so the global batch is always 16."""
    config = TrainConfig(
        epochs=3, batch_size=PER_RANK_BATCH * 2 // world_size, lr=0.2, momentum=0.9, weight_decay=1e-3,
        schedule="cosine", augment=False, progress=False, seed=1,
    )
    model = make_model()
    data = make_data()
    result = train(model, data, config, eval_data=make_data(24, seed=1), device="cpu", group=group)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state_dict": state, "history": result.history, "world_size": world_size}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    with distributed("gloo") as world:
        result = run(world.world_size, world.group)
        if world.rank == 0:
            torch.save(result, out_dir / "result.pt")


if __name__ == "__main__":
    main()
    end_process(0)  # an exception above exits normally (non-zero) with its traceback
