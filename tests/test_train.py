"""TrainConfig validation, learning-rate schedules, the loop dispatch point and one real fit."""

import json

import numpy as np
import pytest

from tfpar.run import schedules, driver as train
from tfpar.run.config import TrainConfig


def test_global_batch_from_global_or_per_replica():
    assert TrainConfig().global_batch_size(2) == train.DEFAULT_GLOBAL_BATCH
    assert TrainConfig(per_replica_batch_size=24).global_batch_size(4) == 96
    with pytest.raises(ValueError, match="does not divide evenly over 2 replicas"):
        TrainConfig(batch_size=63).global_batch_size(2)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(batch_size=64, per_replica_batch_size=32).validate()


@pytest.mark.parametrize("field, value, message", [
    ("model", "resnet7", "Unknown model"),
    ("strategy", "horovod", "Unknown strategy"),
    ("batch_size", -8, "batch_size must be a positive integer"),
    ("optimizer", "lamb", "Unknown optimizer"),
    ("jit_compile", "yes", "jit_compile must be one of"),
    ("profile_steps", "5,2", "profile_steps must be 'A,B'"),
    ("profile_steps", "x", "profile_steps must be 'A,B'"),
    ("lr_schedule", "poly", "Unknown lr_schedule"),
    ("warmup_epochs", 9.0, "warmup_epochs must be"),
    ("label_smoothing", 1.0, "label_smoothing must be"),
    ("grad_accum_steps", 0, "grad_accum_steps must be a positive integer"),
    ("data", "mnist", "Unknown data source"),
])
def test_validate_rejects_with_one_sentence(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(**{field: value}).validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", ["dtensor", "parameter_server"])
def test_gradient_accumulation_is_refused_by_strategies_with_their_own_loop(strategy):
    with pytest.raises(ValueError, match=f"grad_accum_steps=2 works with Keras fit strategies; {strategy} trains"):
        TrainConfig(strategy=strategy, grad_accum_steps=2).validate()
    TrainConfig(strategy="mirrored", grad_accum_steps=2).validate()


def test_step_schedule_needs_increasing_boundaries():
    with pytest.raises(ValueError, match="needs lr_decay_epochs"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(lr_schedule="step", lr_decay_epochs="3,2").validate()
    assert TrainConfig(lr_schedule="step", lr_decay_epochs="2,4").validate().decay_boundaries_epochs() == [2.0, 4.0]


def test_dtensor_fields_are_checked_only_for_dtensor(tmp_path):
    TrainConfig(mesh="nonsense").validate()  # ignored by other strategies
    TrainConfig(strategy="dtensor", mesh="batch=2,model=2").validate()
    with pytest.raises(ValueError, match="mesh must look like"):
        TrainConfig(strategy="dtensor", mesh="batch:2").validate()
    with pytest.raises(ValueError, match="layout_rules file"):
        TrainConfig(strategy="dtensor", layout_rules=str(tmp_path / "none.json")).validate()


def test_linear_scaling_and_schedule_shapes():
    assert schedules.scaled_learning_rate(0.1, 512, 1, 256) == pytest.approx(0.2)
    assert schedules.scaled_learning_rate(0.1, 64, 4, 256) == pytest.approx(0.1)  # 64 x 4 = 256
    assert schedules.scaled_learning_rate(0.05, 64, 1, 0) == 0.05  # scaling off
    cosine = schedules.WarmupDecay(1.0, total_steps=110, warmup_steps=10, kind="cosine")
    values = [float(cosine(s)) for s in (0, 4, 9, 10, 60, 110)]
    assert values[0] == pytest.approx(0.1) and values[1] == pytest.approx(0.5) and values[2] == pytest.approx(1.0)
    assert values[3] == pytest.approx(1.0) and values[4] == pytest.approx(0.5, abs=1e-6) and values[5] == pytest.approx(0.0, abs=1e-6)
    step = schedules.WarmupDecay(1.0, total_steps=100, kind="step", boundaries=(30, 60), decay_rate=0.1)
    assert [float(step(s)) for s in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert float(schedules.WarmupDecay(0.3, 10, kind="constant")(7)) == pytest.approx(0.3)
    restored = schedules.WarmupDecay.from_config(step.get_config())
    assert float(restored(45)) == pytest.approx(0.1)


def test_jit_compile_auto_is_off_on_cpu():
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    assert train.resolve_jit_compile("auto", strategy) is False
    assert train.resolve_jit_compile("on", strategy) is True
    assert train.resolve_jit_compile("off", strategy) is False


def test_run_dispatches_to_a_registered_loop_and_writes_summaries(tmp_path, monkeypatch):
    calls = []

    def fake_loop(config, cluster, print_fn):
        calls.append((config.strategy, cluster.task_name))
        return {"strategy": "Fake", "replicas": 3, "precision": "float32", "epochs_done": 1, "steps_done": 7}

    monkeypatch.setitem(train.TRAINING_LOOPS, "dtensor", fake_loop)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = train.run(TrainConfig(strategy="dtensor", model_dir=str(tmp_path)))
    assert calls == [("dtensor", "worker-0")]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps_done"] == 7 == result["steps_done"] and on_disk["replicas"] == 3
    assert on_disk["config"]["strategy"] == "dtensor" and "keras" in on_disk["versions"]
    assert json.loads((tmp_path / "summary.worker-0.json").read_text()) == on_disk


def test_strategies_without_their_loop_fail_clearly(monkeypatch):
    monkeypatch.delitem(train.TRAINING_LOOPS, "parameter_server", raising=False)
    with pytest.raises(ValueError, match="needs its own training loop"):
        train.training_loop("parameter_server")
    assert train.training_loop("mirrored") is train.fit_loop


@pytest.mark.slow
def test_fit_with_accumulation_smoothing_and_steps_per_execution(tmp_path, monkeypatch):
    """A real one_device fit: 6 steps of 2 micro-batches of 16 -> 6 optimizer updates, loss finite, files written."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = TrainConfig(
        model="resnet18", width_multiplier=0.125, image_size=16, strategy="one_device", batch_size=16,
        epochs=2, steps_per_epoch=3, validation_steps=2, grad_accum_steps=2, label_smoothing=0.1,
        steps_per_execution=3, optimizer="adamw", weight_decay=1e-4, warmup_epochs=0.5,
        learning_rate=0.01, lr_reference_batch=0, model_dir=str(tmp_path), verbose=0,
    )
    lines = []
    result = train.run(config, print_fn=lines.append)
    assert (result["epochs_done"], result["steps_done"], result["optimizer_updates"]) == (2, 6, 6)
    assert result["replicas"] == 1 and result["global_batch_size"] == 16 and result["jit_compile"] is False
    assert result["examples_per_update"] == 32
    assert np.isfinite(result["train_loss"]) and 0 <= result["val_accuracy"] <= 1
    assert result["examples_per_sec"] > 0 and len(result["weights_sha256"]) == 64 and len(result["throughput"]) == 2
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert (tmp_path / "best.weights.h5").exists()


@pytest.mark.slow
def test_validation_steps_0_trains_without_validation(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = TrainConfig(model="resnet18", width_multiplier=0.125, image_size=16, strategy="one_device", batch_size=16,
                         data="synthetic", epochs=2, steps_per_epoch=3, validation_steps=0, model_dir=str(tmp_path),
                         verbose=0)
    result = train.run(config, print_fn=None)
    assert result["steps_done"] == 6 and result["val_accuracy"] is None and result["val_loss"] is None
    assert np.isfinite(result["train_loss"])
    assert (tmp_path / "best.weights.h5").exists()  # the best epoch by training accuracy
