"""Throughput logging to TensorBoard, atomic best-model checkpoints, who prints and who saves."""

import io
import os

import keras
import numpy as np
import pytest

from helpers import event_scalars

from tfpar.run import callbacks
from tfpar.run.config import TrainConfig


def tiny_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_throughput_logger_records_epochs_and_writes_event_scalars(tmp_path):
    x, y = np.random.rand(64, 4).astype("float32"), np.random.randint(0, 3, 64)
    lines = []
    logger = callbacks.ThroughputLogger(8, skip_steps=2, log_dir=str(tmp_path), print_fn=lines.append, prefix="[w1] ")
    tiny_model().fit(x, y, batch_size=8, epochs=3, callbacks=[logger], verbose=0)
    assert len(logger.epochs) == 3 and all(e["steps"] == 8 for e in logger.epochs)
    assert all(e["examples_per_sec"] > 0 and e["step_time_ms"] > 0 for e in logger.epochs)
    assert logger.median_examples_per_sec() == sorted(e["examples_per_sec"] for e in logger.epochs)[1]
    assert len(lines) == 3 and lines[0].startswith("[w1] epoch 1/3: loss ")
    assert " - accuracy " in lines[0] and lines[0].endswith(" ms/step")  # one line per epoch: metrics and speed
    found = event_scalars(tmp_path)
    assert len(found["throughput/examples_per_sec"]) == 3
    assert found["throughput/examples_per_sec"] == pytest.approx([e["examples_per_sec"] for e in logger.epochs])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_for_one_printer_and_long_epochs(monkeypatch):
    auto, explicit = TrainConfig(), TrainConfig(verbose=0)
    assert callbacks.progress_bar_wanted(auto, True, print, Terminal())
    assert not callbacks.progress_bar_wanted(auto, True, print, io.StringIO())  # a pipe or file: lines only
    assert not callbacks.progress_bar_wanted(auto, False, print, Terminal())  # several workers print
    assert not callbacks.progress_bar_wanted(auto, True, [].append, Terminal())  # tfpar's lines go elsewhere
    assert not callbacks.progress_bar_wanted(explicit, True, print, Terminal())
    x, y = np.random.rand(64, 4).astype("float32"), np.random.randint(0, 3, 64)
    for after_sec, shown in ((3600.0, 0), (0.0, 2)):  # short epochs: no bar; long ones: a bar each, erased
        screen = Terminal()
        monkeypatch.setattr("sys.stdout", screen)  # where keras.utils.Progbar writes
        bar = callbacks.ProgressBar(after_sec=after_sec, stream=screen)
        tiny_model().fit(x, y, batch_size=8, epochs=2, callbacks=[bar], verbose=0)
        assert bar.shown == shown
        assert screen.getvalue().count("\r\x1b[2K") == shown and ("/8" in screen.getvalue()) == bool(shown)


def test_best_checkpoint_keeps_only_improvements_atomically(tmp_path):
    model = tiny_model()
    best = callbacks.BestCheckpoint(str(tmp_path / "best.weights.h5"), monitor="val_accuracy")
    best.set_model(model)
    best.on_epoch_end(0, {"val_accuracy": 0.5})
    saved = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in saved])
    best.on_epoch_end(1, {"val_accuracy": 0.4})  # worse: the file keeps epoch 0
    best.on_epoch_end(2, {"val_accuracy": float("nan")})
    restored = tiny_model()
    restored.load_weights(str(tmp_path / "best.weights.h5"))
    for a, b in zip(restored.get_weights(), saved):
        np.testing.assert_array_equal(a, b)
    best.on_epoch_end(3, {"val_accuracy": 0.9})
    restored.load_weights(str(tmp_path / "best.weights.h5"))
    np.testing.assert_array_equal(restored.get_weights()[0], saved[0] + 1)
    assert best.best_epoch == 3 and sorted(os.listdir(tmp_path)) == ["best.weights.h5"]  # no temp file left


def test_for_run_chief_and_workers(tmp_path):
    config = TrainConfig(profile_steps="2,3")
    cbs, throughput = callbacks.for_run(config, str(tmp_path), True, 32, has_validation=True)
    kinds = {type(c).__name__: c for c in cbs}
    assert set(kinds) == {"ThroughputLogger", "TerminateOnNaN", "TensorBoard", "BestCheckpoint"}
    assert (kinds["TensorBoard"]._start_batch, kinds["TensorBoard"]._stop_batch) == (2, 3)
    assert throughput.print_fn is print
    worker_cbs, worker_tp = callbacks.for_run(config, str(tmp_path / "w"), False, 32, has_validation=True)
    assert "BestCheckpoint" not in {type(c).__name__ for c in worker_cbs} and worker_tp.print_fn is None
    loud = TrainConfig(log_all_workers=True, tensorboard=False)
    loud_cbs, loud_tp = callbacks.for_run(loud, str(tmp_path / "l"), False, 32, True, task_name="worker-1")
    assert loud_tp.print_fn is print and loud_tp.prefix == "[worker-1] "
    assert "TensorBoard" not in {type(c).__name__ for c in loud_cbs}
    # Multi-worker: the chief traces, the other workers do not (TF's profiler.stop crashed them).
    chief_tb, = [c for c in callbacks.for_run(config, str(tmp_path / "c"), True, 32, True, multi_worker=True)[0]
                 if type(c).__name__ == "TensorBoard"]
    worker_tb, = [c for c in callbacks.for_run(config, str(tmp_path / "m"), False, 32, True, multi_worker=True)[0]
                  if type(c).__name__ == "TensorBoard"]
    assert chief_tb._should_trace and not worker_tb._should_trace
