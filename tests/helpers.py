"""Shared test helpers: bounded, always-reaped child processes and TensorBoard scalars read back."""

import json
import os
import signal
import subprocess
import sys


def run_reaped(command, timeout, env=None, merge_output=False, **kwargs):
    """Run ``command``; return ``(returncode, stdout, stderr)``.

    The child gets its own session, so on a timeout (or any error) the whole
    group, workers included, is SIGKILLed before this returns.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                            text=True, env=env, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err or ""


def run_together(commands, envs, timeout):
    """Start every command at once (each in its own session, with its env); return ``(returncodes, logs)``.

    For processes that only work together (the clients of one DTensor mesh):
    whatever happens, every process group left running is SIGKILLed.
    """
    procs = []
    try:
        for command, env in zip(commands, envs):
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          start_new_session=True, text=True))
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs], logs


def worker_json(script, args, out, timeout, env=None):
    """Run the test worker ``script`` (beside this file) with ``args``; return the JSON it wrote to ``out``.

    For scenarios that need their own process (logical CPUs are set before
    TensorFlow starts); the process is reaped whatever happens.
    """
    code, _, stderr = run_reaped([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
                                  *args, out], timeout=timeout, env=env)
    assert code == 0, stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def script_result(path, timeout, env=None):
    """Run the test file ``path`` as a script (its scenarios need their own process, e.g. for logical CPUs);
    return its ``RESULT {json}`` line, parsed. The process is reaped whatever happens."""
    code, out, err = run_reaped([sys.executable, os.path.abspath(path)], timeout, env=env,
                                cwd=os.path.dirname(os.path.abspath(path)))
    assert code == 0, (out + err)[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def reap(proc):
    """SIGKILL ``proc``'s process group if it still runs, and wait for it (at most 30 s)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def tfpar_train_command():
    """The installed ``tfpar-train`` console script, or ``python -m tfpar.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "tfpar-train")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "tfpar.cli"]


def quiet_env(**extra):
    """This environment without TF_CONFIG and with TF's C++ logs quiet."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("TF_CONFIG", None)
    return env


def event_scalars(log_dir):
    """``{tag: [values]}`` of the scalar summaries in every event file under ``log_dir``."""
    import tensorflow as tf

    found = {}
    for root, _, files in os.walk(log_dir):
        for name in files:
            if name.startswith("events.out.tfevents"):
                for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                    for value in event.summary.value:
                        if value.metadata.plugin_data.plugin_name != "scalars":
                            continue  # Keras also writes the model config as text
                        found.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return found


def write_worker_result(out_dir, task, result):
    """A worker script's ``result`` as ``out_dir/<type>-<index>.json``, written whole (temp name, then rename)."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{task['type']}-{task['index']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    print("worker finished", flush=True)
