"""Keras callbacks tfpar adds to ``fit``: throughput now; backup and profiling build on it."""

import statistics
import time

import keras
import tensorflow as tf


class ThroughputLogger(keras.callbacks.Callback):
    """Examples/sec and step time per epoch, leaving out each epoch's first steps.

    The first steps of an epoch include tracing, compilation and pipeline
    warm-up, which would understate steady-state speed. Results go to the
    epoch logs (so History and TensorBoard see them) and to ``self.epochs``.
    """

    def __init__(self, global_batch_size, skip_steps=2, log_dir=None, print_fn=print):
        super().__init__()
        self.global_batch_size = global_batch_size
        self.skip_steps = skip_steps
        self.print_fn = print_fn
        self.epochs = []  # one dict per epoch: examples_per_sec, step_time_ms, steps
        self._writer = tf.summary.create_file_writer(log_dir) if log_dir else None

    def on_epoch_begin(self, epoch, logs=None):
        self._step = 0
        self._start = None
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step == self.skip_steps:
            self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        timed = self._step - self.skip_steps
        if self._start is None or timed < 1:
            timed, elapsed = self._step, now - self._epoch_start  # too few steps to skip any
        else:
            elapsed = now - self._start
        steps_per_execution = max(1, getattr(self.model, "steps_per_execution", 1) or 1)
        examples = timed * self.global_batch_size * steps_per_execution
        stats = {
            "examples_per_sec": examples / elapsed if elapsed > 0 else 0.0,
            "step_time_ms": 1000.0 * elapsed / max(timed * steps_per_execution, 1),
            "steps": self._step * steps_per_execution,
        }
        self.epochs.append(stats)
        if logs is not None:
            logs["examples_per_sec"] = stats["examples_per_sec"]
        if self._writer is not None:
            with self._writer.as_default():
                tf.summary.scalar("throughput/examples_per_sec", stats["examples_per_sec"], step=epoch)
                tf.summary.scalar("throughput/step_time_ms", stats["step_time_ms"], step=epoch)
            self._writer.flush()
        if self.print_fn:
            self.print_fn(
                f"epoch {epoch + 1}: {stats['examples_per_sec']:.1f} examples/sec, "
                f"{stats['step_time_ms']:.1f} ms/step"
            )

    def median_examples_per_sec(self):
        values = [e["examples_per_sec"] for e in self.epochs]
        return statistics.median(values) if values else None
