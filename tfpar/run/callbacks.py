"""Keras callbacks tfpar adds to ``fit``: throughput, profiling, best-model checkpoints.

``for_run(config, model_dir, is_chief, ...)`` assembles the list ``run()``
passes to ``fit``; each piece is usable on its own.
"""

import math
import os
import statistics
import sys
import time

import keras
import tensorflow as tf


class ThroughputLogger(keras.callbacks.Callback):
    """Examples/sec and step time per epoch, leaving out each epoch's first steps.

    The first steps of an epoch include tracing, compilation and pipeline
    warm-up, which would understate steady-state speed. Results go to the
    epoch logs (so History and TensorBoard see them) and to ``self.epochs``.
    """

    def __init__(self, global_batch_size, skip_steps=2, log_dir=None, print_fn=print, prefix=""):
        super().__init__()
        self.prefix = prefix
        self.global_batch_size = global_batch_size
        self.skip_steps = skip_steps
        self.print_fn = print_fn
        self.epochs = []  # one dict per epoch: examples_per_sec, step_time_ms, steps
        self._writer = tf.summary.create_file_writer(log_dir) if log_dir else None

    def on_epoch_begin(self, epoch, logs=None):
        self._step = 0
        self._start = self._last = None
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._last = time.perf_counter()  # the epoch's validation pass, which follows, is not training time
        if self._step == self.skip_steps:
            self._start = self._last

    def on_epoch_end(self, epoch, logs=None):
        now = self._last or time.perf_counter()
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
            self.print_fn(f"{self.prefix}{epoch_line(epoch, self.params.get('epochs'), logs, stats)}")

    def median_examples_per_sec(self):
        values = [e["examples_per_sec"] for e in self.epochs]
        return statistics.median(values) if values else None


def _scalar(value):
    """``value`` as a float when it is one number (a Python or NumPy scalar, a 0-d tensor), else None."""
    if getattr(value, "shape", ()) != ():
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def epoch_line(epoch, epochs, logs, stats):
    """'epoch 2/5: loss 0.4123 - accuracy 0.8750 - val_loss ... - 212.3 examples/sec, 301.4 ms/step'."""
    keys = sorted((k for k in (logs or {}) if k != "examples_per_sec" and _scalar(logs[k]) is not None),
                  key=lambda k: (k.startswith("val_"), k.removeprefix("val_") != "loss"))  # loss first, then val_
    shown = "".join(f"{k} {_scalar(logs[k]):.4f} - " for k in keys)
    return (f"epoch {epoch + 1}{f'/{epochs}' if epochs else ''}: {shown}"
            f"{stats['examples_per_sec']:.1f} examples/sec, {stats['step_time_ms']:.1f} ms/step")


class ProgressBar(keras.callbacks.Callback):
    """Keras's progress bar on a terminal, only in epochs long enough to want one.

    The bar (``keras.utils.Progbar``) appears once an epoch has run
    ``after_sec`` seconds, so short epochs show only the one line per epoch
    ``ThroughputLogger`` prints; at the epoch's end the bar is erased and
    that line follows. Place it before ``ThroughputLogger``.
    """

    def __init__(self, after_sec=5.0, stream=None):
        super().__init__()
        self.after_sec = after_sec
        self.stream = stream or sys.stdout
        self.shown = 0  # epochs that showed a bar

    def on_epoch_begin(self, epoch, logs=None):
        self._bar, self._start = None, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        steps = self.params.get("steps")
        if self._bar is None:
            if not steps or batch + 1 >= steps or time.perf_counter() - self._start < self.after_sec:
                return
            self._bar = keras.utils.Progbar(steps, verbose=1, unit_name="step")
            self.shown += 1
        values = [(k, _scalar(v)) for k, v in (logs or {}).items() if _scalar(v) is not None]
        self._bar.update(batch + 1, values)

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self.stream.write("\r\x1b[2K")  # erase the bar's line; the epoch's one line replaces it
            self.stream.flush()
            self._bar = None


def progress_bar_wanted(config, speaks_alone, print_fn, stream=None):
    """Whether ``for_run`` adds a ``ProgressBar``: ``verbose`` unset (auto), one process printing,
    tfpar's lines going to stdout, and stdout a terminal."""
    stream = stream or sys.stdout
    return (config.verbose is None and speaks_alone and print_fn is print
            and hasattr(stream, "isatty") and stream.isatty())


class BestCheckpoint(keras.callbacks.Callback):
    """Keep the weights of the best epoch by ``monitor``, written atomically.

    Keras's ``ModelCheckpoint`` writes in place, so a crash mid-write leaves a
    broken file; this one saves to a temporary name beside the target and
    renames it into place. Only the chief should carry it (``for_run`` does so).
    """

    def __init__(self, path, monitor="val_accuracy", mode=None):
        super().__init__()
        if not path.endswith(".weights.h5"):
            raise ValueError(f"BestCheckpoint path must end with .weights.h5, got {path!r}.")
        self.path, self.monitor = path, monitor
        self.mode = mode or ("max" if "acc" in monitor else "min")
        self.best = -math.inf if self.mode == "max" else math.inf
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if (value > self.best) if self.mode == "max" else (value < self.best):
            self.best, self.best_epoch = value, epoch
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path[: -len(".weights.h5")] + ".tmp.weights.h5"
            self.model.save_weights(tmp, overwrite=True)
            os.replace(tmp, self.path)


def write_text(log_dir, tag, text):
    """One TensorBoard text summary (step 0) under ``log_dir``: what a person reads about the run."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        tf.summary.text(tag, text, step=0)
    writer.close()


def for_run(config, model_dir, is_chief, global_batch_size, has_validation, print_fn=print, task_name="",
            multi_worker=False):
    """The callbacks ``run()`` gives ``fit``: throughput, NaN guard, TensorBoard/profile, best weights.

    Only the chief prints epoch lines and keeps checkpoints, unless
    ``config.log_all_workers`` asks every worker to print (prefixed by task).
    With ``config.verbose`` unset and one process printing to a terminal, a
    ``ProgressBar`` shows progress inside long epochs.
    With ``multi_worker`` only the chief traces ``profile_steps``: a worker
    that does too crashes now and then inside TF's ``profiler.stop``
    (``munmap_chunk(): invalid pointer``, seen on TF 2.21 in 5 of 6 runs
    under pytest, never on the chief); the workers run the same steps.
    Returns ``(callbacks, throughput_logger)``.
    """
    speak = is_chief or config.log_all_workers
    prefix = f"[{task_name}] " if config.log_all_workers and task_name else ""
    throughput = ThroughputLogger(
        global_batch_size,  # examples per step: with gradient accumulation, all its micro-batches
        log_dir=os.path.join(model_dir, "train") if config.tensorboard else None,
        print_fn=print_fn if speak else None, prefix=prefix,  # print_fn=None: silent everywhere
    )
    cbs = [throughput, keras.callbacks.TerminateOnNaN()]
    if speak and progress_bar_wanted(config, not config.log_all_workers, print_fn):
        cbs.insert(0, ProgressBar())  # before the throughput line: it erases its bar first
    if config.tensorboard:
        traced = config.profile_range() if (is_chief or not multi_worker) else None
        cbs.append(keras.callbacks.TensorBoard(log_dir=model_dir, profile_batch=traced or 0))
    if is_chief and config.checkpoint_best:
        monitor = "val_accuracy" if has_validation else "accuracy"
        cbs.append(BestCheckpoint(os.path.join(model_dir, "best.weights.h5"), monitor=monitor))
    return cbs, throughput


class StepsPrinter(keras.callbacks.Callback):
    """``epoch N/E: loss=... steps=... (T s)`` after each epoch, steps read from the optimizer.

    For asynchronous parameter-server training, where the coordinator's finished-step count
    (``optimizer.iterations``) is the progress that counts and there is no throughput logger.
    """

    def __init__(self, print_fn, epochs):
        super().__init__()
        self.print_fn, self.epochs = print_fn, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        steps = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items())
        self.print_fn(f"epoch {epoch + 1}/{self.epochs}: {shown} steps={steps} "
                      f"({time.perf_counter() - self._started:.1f}s)")
