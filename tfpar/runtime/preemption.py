"""Preemption: SIGTERM handling, agreement across workers, the exit code that asks for a restart.

Kubernetes, Slurm and Cloud TPU announce a preemption with SIGTERM and kill
the process a grace period later. ``watch()`` notes the signal; the backup
callback asks ``agreed(strategy)`` at every batch end and, when it says yes,
saves a backup and exits with ``EXIT_PREEMPTED`` so a launcher restarts it.

Agreement across workers is a per-step all-reduce (SUM) of a 0/1 flag: every
worker asks at the same step, so all of them see the same answer and save at
the same step, as ``MultiWorkerMirroredStrategy`` checkpoints need. It is one
scalar collective per step on top of the gradient all-reduce. TF's
``tf.distribute.experimental.PreemptionCheckpointHandler`` does the same job
through the coordination service, but it drives its own checkpoint and
counts its own steps, which does not fit Keras ``fit`` callbacks and
tfpar's atomic backup layout.

The signal is noticed by a thread reading ``signal.set_wakeup_fd``, which
starts the grace-period timer without waiting for the main thread. A main
thread blocked inside TensorFlow *while holding the GIL* (as MWMS start-up
does) stops that thread too; the orchestrator's SIGKILL ends such a process,
and ``peers.within`` bounds the start-up case through TF's own registration
deadline. Peers that are unreachable or lost are ``tfpar.runtime.peers``'s.
"""

import contextlib
import os
import signal
import sys
import threading

from tfpar.core.devices import any_worker_fn, is_multi_worker

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: a backup is saved; restart me
DEFAULT_GRACE_SEC = 25.0  # Kubernetes waits 30 s between SIGTERM and SIGKILL by default


class Preempted(SystemExit):
    """Raised after a preemption backup; exits the process with ``EXIT_PREEMPTED``."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class Watch:
    """SIGTERM seen? Agreed by all workers? Started by ``watch()``, ended by ``close()``."""

    def __init__(self, grace_period, print_fn):
        self.grace_period = grace_period
        self.print_fn = print_fn
        self.requested = threading.Event()
        self._timer = None
        self._any_worker = None
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._listen, name="tfpar-sigterm", daemon=True)
        self._thread.start()

    def _listen(self):
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data and not self.requested.is_set():
                self.requested.set()
                self._timer = threading.Timer(self.grace_period, self._out_of_time)
                self._timer.daemon = True
                self._timer.start()

    def _out_of_time(self):
        sys.stderr.write(f"tfpar: SIGTERM and no training step finished within {self.grace_period:g} s; "
                         f"exiting with {EXIT_PREEMPTED} without a new backup\n")
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)

    def agreed(self, strategy):
        """True on every worker once any worker got SIGTERM (same answer, same step)."""
        flag = self.requested.is_set()
        if strategy is None or not is_multi_worker(strategy):
            return flag
        import tensorflow as tf

        if self._any_worker is None:
            self._any_worker = any_worker_fn(strategy)
        return int(self._any_worker(tf.constant(int(flag), tf.int32)).numpy()) > 0

    def exit(self, what):
        """Leave training with ``EXIT_PREEMPTED`` (the grace timer stays armed in case exiting hangs)."""
        self.print_fn(f"preempted (SIGTERM): {what}; exiting with {EXIT_PREEMPTED} so the launcher restarts")
        self._restore_signals()
        raise Preempted()

    def _restore_signals(self):
        if self._old_handler is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        signal.signal(signal.SIGTERM, self._old_handler)
        self._old_handler = None
        os.close(self._write_fd)  # the listener reads EOF and ends

    def close(self):
        """Stop watching: put back the previous SIGTERM handler and cancel the timer."""
        self._restore_signals()
        if self._timer is not None:
            self._timer.cancel()
        self._thread.join(timeout=1.0)
        with contextlib.suppress(OSError):
            os.close(self._read_fd)


def watch(grace_period=DEFAULT_GRACE_SEC, print_fn=print):
    """Start watching for SIGTERM (call from the main thread); returns a ``Watch``.

    Returns None when not on the main thread, where signals cannot be handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return Watch(grace_period, print_fn or (lambda *a, **k: None))
