"""Ray Train as the engine (tfpar.ray): Keras 3 under TensorflowTrainer on a local Ray cluster.

The local cluster listens on 127.0.0.1 only, has no dashboard, and is shut
down at the end of each test; the test checks that no raylet or GCS server
is left behind. Worker processes are Ray's; every wait is bounded.
"""

import json
import os
import signal
import sys
import time

import pytest

import keras
import ray
import ray.train
from ray import cloudpickle

from helpers import run_reaped, tfpar_train_command

from tfpar.run import ray as tfpar_ray
from tfpar.run.config import TrainConfig

TINY = dict(model="resnet18", width_multiplier=0.125, batch_size=32, steps_per_epoch=4, validation_steps=1,
            tensorboard=False, verbose=0, checkpoint_best=False)
RAY_DAEMONS = ("raylet", "gcs_server")


def ray_daemons():
    """PIDs of Ray's raylet and GCS server processes on this machine."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() in RAY_DAEMONS:
                        found.append(int(name))
            except OSError:
                pass
    return found


def assert_no_daemons_left(before, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(ray_daemons()) - set(before):
        time.sleep(0.5)
    assert not set(ray_daemons()) - set(before), "Ray processes left behind"


@pytest.fixture
def local_ray():
    before = ray_daemons()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    try:
        yield
    finally:
        ray.shutdown()
        assert_no_daemons_left(before)


class KillRank1Once(keras.callbacks.Callback):
    """SIGKILLs Ray worker rank 1 at the start of epoch 2 of the first attempt (a marker file says it did)."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/


@pytest.mark.slow
def test_worker_killed_mid_run_is_restarted_by_ray_and_the_run_resumes_from_the_backup(local_ray, tmp_path):
    marker = tmp_path / "killed"
    config = TrainConfig(**TINY, epochs=3, model_dir=str(tmp_path / "run"))
    summary = tfpar_ray.train(config, num_workers=2, max_failures=1, callbacks=[KillRank1Once(str(marker))])
    assert marker.exists()  # the first attempt lost rank 1 in epoch 2
    # The restarted group resumed from the epoch-1 backup Ray's checkpoint carried, and finished.
    assert summary["resumed_from"]["epoch"] == 1 and summary["resumed_from"]["step"] == 4, summary["resumed_from"]
    assert summary["epochs_done"] == 3 and summary["optimizer_updates"] == 12  # the whole run, across the restart
    assert summary["strategy"] == "multi-worker ×2" and summary["replicas"] == 2
    assert summary["versions"]["keras"].startswith("3.")
    workers = [json.loads((tmp_path / "run" / f"summary.worker-{i}.json").read_text()) for i in range(2)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    # The chief reported each epoch to Ray; the last report is epoch 3's, with Keras's logs.
    assert summary["ray_metrics"]["epoch"] == 3 and summary["ray_metrics"]["loss"] > 0, summary["ray_metrics"]
    assert summary["ray_metrics"]["loss"] == pytest.approx(summary["train_loss"])
    # Ray kept the last epoch's checkpoint, a tfpar backup at step 12.
    meta = json.loads(open(os.path.join(summary["ray_checkpoint"], "backup.json")).read())
    assert (meta["step"], meta["epoch"], meta["num_workers"]) == (12, 3, 2)


@pytest.mark.slow
def test_tfpar_train_launcher_ray_trains_two_workers_with_equal_weights(tmp_path):
    before = ray_daemons()
    model_dir = tmp_path / "run"
    flags = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY.items()]
    code, out, err = run_reaped([*tfpar_train_command(), "--launcher=ray", "--workers=2", *flags, "--epochs=2",
                                 f"--model_dir={model_dir}"], timeout=400,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RAY_ADDRESS=""))
    assert code == 0, (out + err)[-4000:]
    assert_no_daemons_left(before)
    workers = [json.loads((model_dir / f"summary.worker-{i}.json").read_text()) for i in range(2)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]
    assert all(w["num_workers"] == 2 and w["optimizer_updates"] == 8 for w in workers)
    assert workers[0]["train_loss"] is not None
    assert "done:" in out


def test_launcher_ray_refuses_another_strategy():
    with pytest.raises(ValueError, match="--launcher=ray trains with --strategy=multi_worker"):
        tfpar_ray.worker_config(TrainConfig(strategy="mirrored"))
    with pytest.raises(ValueError, match="launcher must be one of"):
        TrainConfig(launcher="slurm").validate()


def test_user_errors_are_found_before_ray_starts(tmp_path):
    with pytest.raises(ValueError, match="does not exist|not found|no such|No such"):
        tfpar_ray.train(TrainConfig(data=f"folder:{tmp_path / 'missing'}", model_dir=str(tmp_path / "a")))
    # A backup written by 3 workers is refused for a 2-worker Ray run.
    os.makedirs(tmp_path / "b" / "backup" / "step-000000004")
    meta = {"format": 1, "step": 4, "epoch": 1, "batch": 0, "num_workers": 3, "files": {},
            "signature": {"model": "resnet18"}}
    (tmp_path / "b" / "backup" / "step-000000004" / "backup.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="written by 3 worker"):
        tfpar_ray.train(TrainConfig(**TINY, model_dir=str(tmp_path / "b")), num_workers=2)
    assert not ray.is_initialized()
