"""The training loop (deepshrink.train): learning, determinism, schedules, compression state, DDP."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.parametrizations import Masked, SharedWeights
from deepshrink.data import Batches, ImageData
from deepshrink.errors import ConfigError, DataError, DeepShrinkError
from deepshrink.models import build_model
from deepshrink.train import (
    OptimizerName,
    Schedule,
    TrainConfig,
    distillation_loss,
    evaluate,
    is_main_process,
    learning_rate,
    seed_everything,
    train,
)

TESTS = Path(__file__).resolve().parent
FAST = dict(progress=False, augment=False)


def quadrant_data(n: int = 256, seed: int = 0) -> ImageData:
    """Learnable 1x4x4 noise images whose label is the 2x2 quadrant brightened by 128 levels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 128, (n, 1, 2, 2, 2, 2), generator=g)  # (n, 1, row half, row, col half, col)
    images[torch.arange(n), 0, labels // 2, :, labels % 2] += 128
    return ImageData(images.view(n, 1, 4, 4).to(torch.uint8), labels, ("a", "b", "c", "d"), (0.5,), (0.25,), "quadrants")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread (no OpenMP hand-offs on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mlp(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return build_model({"arch": "mlp", "kwargs": {"num_classes": 4, "image_size": 4, "hidden": [32]}})


def test_training_learns_a_learnable_task():
    model, data, test = tiny_mlp(), quadrant_data(512), quadrant_data(256, seed=1)
    before = evaluate(model, test)
    config = TrainConfig(epochs=5, batch_size=32, lr=0.1, weight_decay=0, **FAST)
    result = train(model, data, config, eval_data=test)
    assert before["accuracy"] < 0.5
    assert result.final["test_accuracy"] > 0.95
    assert result.final["test_loss"] < 0.25 * before["loss"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.final == result.history[-1]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]


def test_same_seed_gives_identical_weights_and_another_seed_does_not():
    def run(seed: int) -> dict:
        model = tiny_mlp()
        train(model, quadrant_data(), TrainConfig(epochs=2, batch_size=16, seed=seed, **FAST))
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed drives the shuffling


def test_cosine_schedule_starts_at_lr_and_ends_near_zero():
    config = TrainConfig(epochs=10, lr=0.2, schedule=Schedule.COSINE)
    values = [learning_rate(config, e / 10) for e in range(100)]
    assert values[0] == pytest.approx(0.2)
    assert learning_rate(config, 5.0) == pytest.approx(0.1)
    assert values[-1] < 1e-3
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_schedule_drops_at_step_epochs():
    config = TrainConfig(epochs=6, lr=1.0, schedule="step", step_epochs=(2, 4), gamma=0.1)
    assert [learning_rate(config, e) for e in (0, 1.99, 2, 3.5, 4, 5.9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    result = train(tiny_mlp(), quadrant_data(64), TrainConfig(
        epochs=3, batch_size=16, lr=0.1, schedule="step", step_epochs=(1, 2), **FAST))
    assert [r["lr"] for r in result.history] == pytest.approx([0.1, 0.01, 0.001])


def test_warmup_ramps_linearly_then_follows_the_schedule():
    config = TrainConfig(epochs=4, lr=1.0, schedule="constant", warmup_epochs=2)
    assert learning_rate(config, 0.0, steps_per_epoch=4) == pytest.approx(0.125)
    assert learning_rate(config, 1.0, steps_per_epoch=4) == pytest.approx(0.625)
    assert learning_rate(config, 3.0, steps_per_epoch=4) == 1.0


class ConstantLogits(nn.Module):
    """Ignores the input; predicts class 1 with probability 3/4 (of 2 classes)."""

    def forward(self, x):
        return torch.tensor([0.0, math.log(3.0)]).expand(x.shape[0], 2)


def test_evaluate_on_a_hand_made_case():
    labels = torch.tensor([1, 1, 1, 0, 1, 0, 1])
    data = ImageData(torch.zeros(7, 1, 2, 2, dtype=torch.uint8), labels, ("no", "yes"), (0.0,), (1.0,), "hand")
    result = evaluate(ConstantLogits(), data, batch_size=3)  # 3 batches, the last one short
    assert result["n"] == 7
    assert result["accuracy"] == pytest.approx(5 / 7)
    assert result["loss"] == pytest.approx((5 * -math.log(0.75) + 2 * -math.log(0.25)) / 7)


def test_evaluate_restores_training_mode():
    model = build_model("lenet5").train()
    data = ImageData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                     tuple("0123456789"), (0.1,), (0.3,), "zeros")
    evaluate(model, data)
    assert model.training


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", -1), ("batch_size", 0), ("optimizer", "rmsprop"), ("lr", 0.0), ("lr", float("nan")),
        ("momentum", 1.0), ("weight_decay", -1e-4), ("schedule", "linear"), ("step_epochs", (3, 2)),
        ("step_epochs", ("x",)), ("gamma", 0.0), ("warmup_epochs", 20), ("label_smoothing", 1.0), ("log_every", 0),
        ("seed", -1), ("seed", "0"), ("momentum", None), ("gamma", "x"), ("amp", "no"), ("augment", 1),
        ("distill_weight", 1.5), ("distill_weight", -0.1), ("distill_temperature", 0.0), ("distill_temperature", "4"),
    ],
)
def test_config_validation_names_the_field_and_value(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_config_normalises_enums_and_lists_to_plain_values():
    config = TrainConfig(optimizer=OptimizerName.ADAM, schedule=Schedule.STEP, step_epochs=[5, 8])
    assert config.optimizer == "adam" and type(config.optimizer) is str
    assert config.schedule == "step" and config.step_epochs == (5, 8)
    with pytest.raises(ConfigError, match="nesterov"):
        TrainConfig(optimizer="adam", nesterov=True)


def test_model_without_trainable_parameters_is_refused():
    model = tiny_mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(model, quadrant_data(32), TrainConfig(epochs=1, **FAST))


def test_empty_training_data_is_refused():
    with pytest.raises(DataError, match="no training samples"):
        train(tiny_mlp(), quadrant_data(0), TrainConfig(epochs=1, **FAST))


def test_diverging_training_raises():
    with pytest.raises(DeepShrinkError, match="training loss is"):
        train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=1, batch_size=8, lr=1e30, weight_decay=0, **FAST))


def test_callback_sees_every_epoch_record():
    seen = []
    result = train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=3, batch_size=16, **FAST), callback=seen.append)
    assert seen == result.history
    assert is_main_process()


def test_zero_epochs_only_evaluates():
    model = tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, quadrant_data(32), TrainConfig(epochs=0, **FAST), eval_data=quadrant_data(32, seed=1))
    assert result.history == [] and 0 <= result.final["test_accuracy"] <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- compression state rides along


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masked_weights_stay_exactly_zero(optimizer):
    model = tiny_mlp()
    weight = model.fc1.weight.detach().clone()
    mask = weight.abs() > weight.abs().median()
    parametrize.register_parametrization(model.fc1, "weight", Masked(mask))
    config = TrainConfig(epochs=3, batch_size=16, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01,
                         momentum=0.9, weight_decay=1e-2, **FAST)
    train(model, quadrant_data(), config)
    effective = model.fc1.weight
    original = model.fc1.parametrizations.weight.original
    assert torch.equal(effective[~mask], torch.zeros(int((~mask).sum())))
    assert not torch.equal(effective[mask], weight[mask])  # the kept weights did train
    assert not torch.equal(original[~mask], weight[~mask])  # weight decay/Adam moved the hidden originals


def test_shared_weights_train_only_their_centroids():
    model = tiny_mlp()
    original = model.fc1.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 5, original.shape, generator=g)  # 0 = pruned, 1..4 = centroids
    centroids = torch.tensor([-0.3, -0.1, 0.1, 0.3])
    parametrize.register_parametrization(model.fc1, "weight", SharedWeights(centroids, indices, bits=2))
    model.fc1.parametrizations.weight.original.requires_grad_(False)  # what quantize_model does
    shared = model.fc1.parametrizations.weight[0]
    train(model, quadrant_data(), TrainConfig(epochs=2, batch_size=16, lr=0.05, **FAST))
    assert torch.equal(shared.indices.long(), indices)
    assert torch.equal(model.fc1.parametrizations.weight.original, original)
    assert not torch.equal(shared.centroids.detach(), centroids)
    assert torch.equal(model.fc1.weight, shared.codebook()[indices].detach())
    assert model.fc1.weight.unique().numel() <= 5


# ---------------------------------------------------------------- distributed


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", TESTS / "ddp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(TESTS / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.pt"]  # rank 1 wrote nothing
    ddp = torch.load(tmp_path / "result.pt", weights_only=True)
    assert ddp["world_size"] == 2

    worker = _load_worker()
    single = worker.run(world_size=1)
    initial = worker.make_model().state_dict()
    for key, value in single["state_dict"].items():
        assert torch.allclose(ddp["state_dict"][key].float(), value.float(), atol=1e-5), key
    moved = (single["state_dict"]["fc2.weight"] - initial["fc2.weight"]).abs().max()
    assert moved > 1e-2  # training changed the weights far beyond the tolerance
    for got, want in zip(ddp["history"], single["history"]):  # metrics averaged over both ranks
        for name in ("loss", "train_accuracy", "test_accuracy", "test_loss", "lr"):
            assert got[name] == pytest.approx(want[name], abs=1e-5), name


def test_keep_best_restores_the_epoch_of_best_validation_accuracy():
    validation = quadrant_data(128, seed=2)
    # a learning rate this high makes later epochs worse on validation, so the best epoch is not the last
    config = TrainConfig(epochs=6, batch_size=16, lr=3.0, momentum=0.9, weight_decay=0, schedule="constant", **FAST)
    plain = train(tiny_mlp(), quadrant_data(), config, validation_data=validation)
    accs = [r["validation_accuracy"] for r in plain.history]
    best = accs.index(max(accs)) + 1
    assert plain.best_epoch == best and best < 6, accs  # the setting must exercise a restore

    model = tiny_mlp()
    kept = train(model, quadrant_data(), dataclasses.replace(config, keep_best=True), validation_data=validation)
    assert kept.best_epoch == best and kept.final == kept.history[best - 1]
    assert evaluate(model, validation)["accuracy"] == pytest.approx(max(accs))


def test_patience_stops_after_epochs_without_a_better_validation_accuracy():
    config = TrainConfig(epochs=8, batch_size=16, lr=3.0, weight_decay=0, schedule="constant", patience=1, **FAST)
    result = train(tiny_mlp(), quadrant_data(), config, validation_data=quadrant_data(128, seed=2))
    accs = [r["validation_accuracy"] for r in result.history]
    # stopped at the first epoch that did not improve on every epoch before it
    assert len(accs) < 8 and accs[-1] <= max(accs[:-1])
    assert all(a < b for a, b in zip(accs[:-2], accs[1:-1]))


def test_selection_without_validation_data_is_refused():
    for option in ({"keep_best": True}, {"patience": 2}):
        with pytest.raises(ConfigError, match="validation_data"):
            train(tiny_mlp(), quadrant_data(32), TrainConfig(epochs=1, **option, **FAST), eval_data=quadrant_data(16))


def _without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


class Killed(Exception):
    pass


@pytest.mark.parametrize("keep_best", [False, True])
def test_a_stopped_run_continues_from_its_state_file_to_the_uninterrupted_result(tmp_path, keep_best):
    validation = quadrant_data(128, seed=2)
    # momentum and a rate high enough that the best epoch is not the last: the optimizer's state and
    # the best weights must both survive the stop
    config = TrainConfig(epochs=6, batch_size=16, lr=3.0, momentum=0.9, weight_decay=0, schedule="constant",
                         keep_best=keep_best, progress=False)
    whole_model = tiny_mlp()
    whole = train(whole_model, quadrant_data(), config, validation_data=validation)
    assert 2 < whole.best_epoch < 6, whole.history

    state = tmp_path / "state.pt"

    def stop_in_epoch_3(record):
        if record["epoch"] == 3:  # its state is not written yet: the epoch is lost, as in a kill
            raise Killed

    with pytest.raises(Killed):
        train(tiny_mlp(), quadrant_data(), config, validation_data=validation, state_file=state,
              callback=stop_in_epoch_3)
    assert torch.load(state, weights_only=True)["epoch"] == 2
    model = tiny_mlp(seed=7)  # the state file, not the model passed in, decides where training continues
    seen = []
    continued = train(model, quadrant_data(), config, validation_data=validation, state_file=state,
                      callback=lambda record: seen.append(record["epoch"]))
    assert seen == [3, 4, 5, 6]
    assert _without_times(continued.history) == _without_times(whole.history)
    assert continued.best_epoch == whole.best_epoch
    for (name, a), (_, b) in zip(model.state_dict().items(), whole_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_state_file_of_a_finished_or_early_stopped_run_trains_no_further(tmp_path):
    config = TrainConfig(epochs=8, batch_size=16, lr=3.0, weight_decay=0, schedule="constant", patience=1,
                         progress=False, augment=False)
    state = tmp_path / "state.pt"
    stopped = train(tiny_mlp(), quadrant_data(), config, validation_data=quadrant_data(128, seed=2), state_file=state)
    assert len(stopped.history) < 8  # the setting must stop early
    again = train(tiny_mlp(), quadrant_data(), config, validation_data=quadrant_data(128, seed=2), state_file=state,
                  callback=lambda record: pytest.fail(f"trained epoch {record['epoch']} again"))
    assert _without_times(again.history) == _without_times(stopped.history)


def test_a_state_file_from_other_settings_or_damaged_is_refused_naming_it(tmp_path):
    state = tmp_path / "state.pt"
    train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=1, batch_size=16, **FAST), state_file=state)
    with pytest.raises(ConfigError, match=r"state\.pt: cannot continue.*other training settings.*delete it"):
        train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=2, batch_size=16, **FAST), state_file=state)
    saved = torch.load(state, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "history"}, state)
    with pytest.raises(ConfigError, match=r"state\.pt: cannot continue.*lacks \['history'\]"):
        train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=1, batch_size=16, **FAST), state_file=state)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"state\.pt: cannot continue"):
        train(tiny_mlp(), quadrant_data(64), TrainConfig(epochs=1, batch_size=16, **FAST), state_file=state)


# ---------------------------------------------------------------- distillation


def test_distillation_loss_is_zero_only_when_the_student_matches_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    assert distillation_loss(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(teacher + torch.tensor([0.0, 1.0, 0.0]), teacher, 4.0).item() > 1e-3
    # a constant shift of a row's logits leaves its softmax, and so the loss, unchanged
    assert distillation_loss(teacher + 5.0, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_a_student_trained_on_the_teacher_alone_learns_the_teachers_outputs():
    data = quadrant_data()
    teacher = tiny_mlp(seed=1)  # untrained: its outputs are unrelated to the labels
    config = TrainConfig(epochs=10, batch_size=32, lr=0.05, weight_decay=0, distill_weight=1.0,
                         distill_temperature=1.0, **FAST)
    student = tiny_mlp(seed=2)

    x, _ = next(iter(Batches(data, len(data))))  # every image, normalised as training sees them

    def gap() -> float:
        with torch.no_grad():
            return distillation_loss(student(x), teacher(x), 1.0).item()

    before = gap()
    train(student, data, config, teacher=teacher)
    assert gap() < 0.2 * before
    assert not teacher.training  # the teacher ran in eval mode and kept its weights
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), tiny_mlp(seed=1).state_dict().values()))


def test_distillation_needs_both_a_teacher_and_a_weight():
    data = quadrant_data(32)
    with pytest.raises(ConfigError, match="teacher"):
        train(tiny_mlp(), data, TrainConfig(epochs=1, distill_weight=0.5, **FAST))
    with pytest.raises(ConfigError, match="distill_weight"):
        train(tiny_mlp(), data, TrainConfig(epochs=1, **FAST), teacher=tiny_mlp(seed=1))
    other = build_model({"arch": "mlp", "kwargs": {"num_classes": 3, "image_size": 4, "hidden": [8]}})
    with pytest.raises(ConfigError, match=r"teacher's outputs \(16, 3\) do not match the student's \(16, 4\)"):
        train(tiny_mlp(), data, TrainConfig(epochs=1, batch_size=16, distill_weight=0.5, **FAST), teacher=other)
