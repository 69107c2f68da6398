"""``benchmark.py --only elastic``: images/sec on 2 workers, then on 1 after a shrink, and the time lost.

A real ``tfpar-launch --workers 2 --restarts 1 --min_workers 1`` run: worker 1
SIGKILLs itself at step ``kill_at`` and fails at every start after that (its
host is gone). The launcher restarts the cluster, leaves worker 1 out, and the
run resumes its last backup on worker 0 alone with the same global batch. Every
step's end is stamped on the chief; the time lost is from the kill to the first
step trained on the survivor (restarts, TensorFlow start-up, restore and the
steps redone since the backup).

Run as ``bench_elastic.py --worker CASE_JSON`` it is that worker.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

STAMP = "ELASTIC_STEP "


def _worker(case):
    task = json.loads(os.environ["TF_CONFIG"])
    index, size = task["task"]["index"], len(task["cluster"]["worker"])
    marker = os.path.join(case["model_dir"], "worker-1-gone")
    if index == 1 and os.path.exists(marker):
        sys.exit(1)  # its host is gone: every start fails
    from tfpar.core import quiet

    quiet.start_tensorflow()
    import keras

    from tfpar.run import driver

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if index == 1 and size == 2 and self.steps_done() + 1 == case["kill_at"]:
                open(marker, "w").close()
                print(f"{STAMP}kill {time.time()}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_train_batch_end(self, batch, logs=None):
            if index == 0:
                print(f"{STAMP}{size} {self.steps_done()} {time.time()}", flush=True)

        def steps_done(self):
            return int(self.model.optimizer.iterations.numpy())

    config = driver.TrainConfig(
        model=case["model"], image_size=case["image"], num_classes=case["classes"], data="synthetic",
        strategy="multi_worker", batch_size=case["batch"], epochs=case["epochs"], steps_per_epoch=case["steps"],
        validation_steps=0, backup_freq=str(case["backup_every"]), model_dir=case["model_dir"], tensorboard=False,
        checkpoint_best=False, verbose=0, cluster_timeout=60.0, **case.get("train_options", {}))
    driver.run(config, print_fn=print, callbacks=[Stamp()])


def _rate(stamps, batch, skip):
    """Images/sec over consecutive step stamps [(step, t)], leaving out the first ``skip`` (warm-up)."""
    kept = stamps[skip:]
    if len(kept) < 2:
        return None
    return batch * (kept[-1][0] - kept[0][0]) / (kept[-1][1] - kept[0][1])


def measure(case):
    """Run the shrink once; ``rates``: images/sec after it (1 worker), with the 2-worker rate and the time lost."""
    with tempfile.TemporaryDirectory() as tmp:
        case = dict(case, model_dir=os.path.join(tmp, "run"))
        os.makedirs(case["model_dir"])
        argv = [sys.executable, "-m", "tfpar.runtime.launcher", "--workers", "2", "--restarts", "1",
                "--min_workers", "1", "--timeout", "1500", "--", sys.executable, os.path.abspath(__file__),
                "--worker", json.dumps(case)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1600,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if proc.returncode != 0:
        raise RuntimeError(f"the elastic run failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    before, after, killed = [], [], None
    for line in proc.stdout.splitlines():
        if STAMP not in line:
            continue
        fields = line.split(STAMP, 1)[1].split()
        if fields[0] == "kill":
            killed = float(fields[1])
        else:
            (before if fields[0] == "2" else after).append((int(fields[1]), float(fields[2])))
    if killed is None or not before or not after:
        raise RuntimeError("the elastic run did not shrink: " + proc.stdout[-2000:])
    batch = case["batch"]
    return {
        "rates": [batch / (b[1] - a[1]) * (b[0] - a[0]) for a, b in zip(after[1:], after[2:])],
        "images_per_sec_before": _rate(before, batch, 2),
        "images_per_sec_after": _rate(after, batch, 2),
        "lost_sec": round(after[0][1] - killed, 1),  # from the kill to the first step trained on the survivor
        "resumed_at_step": after[0][0] - 1,
        "killed_in_step": case["kill_at"],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(json.loads(sys.argv[2]))
    else:
        print(json.dumps(measure(json.loads(sys.argv[1]) if len(sys.argv) > 1 else dict(
            model="resnet18", image=32, classes=10, batch=32, epochs=4, steps=6, kill_at=12, backup_every=4,
            train_options={"width_multiplier": 0.25})), indent=1))
