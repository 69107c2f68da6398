"""TrainConfig validation, learning-rate schedules, the driver's hook table and skeleton, and one real fit."""

import json

import numpy as np
import pytest

from tfpar.run import schedules, driver as train
from tfpar.run.config import TrainConfig
from tfpar.run.hooks import pipeline as pipeline_hooks
from tfpar.run.hooks.base import Hook
from tfpar.run.hooks.keras_fit import KerasFit
from tfpar.run.hooks.parameter_server import ParameterServer
from tfpar.run.hooks.pipeline import Pipeline


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

    from tfpar.step import xla

    strategy = tf.distribute.get_strategy()
    assert xla.resolve("auto", strategy) is False
    assert xla.resolve("on", strategy) is True
    assert xla.resolve("off", strategy) is False


class RecordingHook(KerasFit):
    """The default hook on TF's default strategy, recording the skeleton's calls to it."""

    calls = []

    def __init__(self, config, info, print_fn=print):
        super().__init__(config, info, print_fn)
        self.calls.append(("made", config.strategy, info.task_name))

    def _make_strategy(self):
        import tensorflow as tf

        return tf.distribute.get_strategy()

    def __getattribute__(self, name):
        if name in ("check", "serves", "connect", "reading", "scope", "shaped", "compiled", "install", "callbacks",
                    "start_lines", "fit_options", "guard", "summary"):
            type(self).calls.append(name)
        return super().__getattribute__(name)

    def summary(self, model, history, pipes):
        return {**super().summary(model, history, pipes), "steps_done": 7, "fake": True}


def test_run_dispatches_to_the_registered_hook_and_writes_summaries(tmp_path, monkeypatch):
    """One tiny real fit through the skeleton: the hook is asked in order, its fields reach summary.json."""
    RecordingHook.calls = []
    monkeypatch.setitem(train.HOOKS, "dtensor", RecordingHook)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = TrainConfig(strategy="dtensor", model_dir=str(tmp_path), model="resnet18", width_multiplier=0.125,
                         image_size=16, batch_size=8, epochs=1, steps_per_epoch=1, validation_steps=0,
                         tensorboard=False, checkpoint_best=False, backup_freq="none", verbose=0)
    lines = []
    result = train.run(config, print_fn=lines.append)
    assert RecordingHook.calls == [
        ("made", "dtensor", "worker-0"), "check", "serves", "connect", "reading", "scope", "shaped", "compiled",
        "install", "callbacks", "start_lines", "fit_options", "guard", "summary"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["steps_done"] == 7 == result["steps_done"] and on_disk["fake"] is True
    assert on_disk["replicas"] == 1 and on_disk["epochs_done"] == 1 and on_disk["optimizer_updates"] == 1
    assert on_disk["config"]["strategy"] == "dtensor" and "keras" in on_disk["versions"]
    assert json.loads((tmp_path / "summary.worker-0.json").read_text()) == on_disk
    assert [line for line in lines if "global batch 8" in line and "1 steps/epoch" in line], lines


def test_every_strategy_has_a_hook_and_unknown_ones_fail_clearly(monkeypatch):
    from tfpar.runtime import strategies

    for name in strategies.NAMES + ("dtensor", "pipeline"):
        assert issubclass(train.hook_for(name), Hook), name
    assert train.hook_for("mirrored") is KerasFit and train.hook_for("auto") is KerasFit
    assert train.hook_for("pipeline") is Pipeline and train.hook_for("parameter_server") is ParameterServer
    monkeypatch.delitem(train.HOOKS, "parameter_server", raising=False)
    with pytest.raises(ValueError, match="'parameter_server' has no training hook"):
        train.hook_for("parameter_server")


@pytest.mark.parametrize("strategy", ["dtensor", "parameter_server"])
def test_own_loop_strategies_refuse_extra_callbacks(strategy, tmp_path, monkeypatch):
    import keras

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=f"Extra Keras callbacks need a Keras fit strategy; {strategy} has its own"):
        train.run(TrainConfig(strategy=strategy, model_dir=str(tmp_path)), callbacks=[keras.callbacks.Callback()])


def test_each_run_gets_its_own_hook_state():
    from tfpar.runtime.cluster import ClusterInfo

    config = TrainConfig(strategy="pipeline")
    first, second = Pipeline(config, ClusterInfo()), Pipeline(config, ClusterInfo())
    first.stage_devices = ["/job:worker/replica:0/task:0/device:CPU:0"]
    assert second.stage_devices is None and second.heartbeat is None  # nothing shared through the config


def test_pipeline_cluster_checks_read_plain_values():
    from tfpar.runtime.cluster import ClusterInfo

    workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    pipeline_hooks.check_cluster(workers, stages=2, replicas=1)  # fits: no error
    with pytest.raises(ValueError, match="needs exactly 4 worker task\\(s\\).*has 2"):
        pipeline_hooks.check_cluster(workers, stages=2, replicas=2)
    with pytest.raises(ValueError, match="has a ps job"):
        pipeline_hooks.check_cluster({**workers, "ps": ["127.0.0.1:3"]}, stages=2, replicas=1)
    with pytest.raises(ValueError, match="also has a chief job"):
        pipeline_hooks.check_cluster({**workers, "chief": ["127.0.0.1:3"]}, stages=2, replicas=1)
    config = TrainConfig(strategy="pipeline")
    stage = ClusterInfo("worker", 1, 2, 0, "tf_config", workers)
    chief = ClusterInfo("worker", 0, 2, 0, "tf_config", workers)
    assert Pipeline(config, stage).serves() and not Pipeline(config, chief).serves()
    assert not Pipeline(config, ClusterInfo()).serves()  # one process: no stage tasks
    assert not Pipeline(config, ClusterInfo("worker", 1, 2, 0, "tpu", workers)).serves()  # a TPU's hosts


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


def test_the_hook_table_imports_no_tensorflow():
    """``tfpar.train`` (and its hook table) loads without TensorFlow, so the CLI can quiet TF's logs first."""
    import subprocess
    import sys

    code = "import sys, tfpar.train, tfpar.run.driver; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
