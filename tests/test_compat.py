"""tfpar.compat: gating, idempotence, and the upstream defects shown with real worker processes.

The slow tests run 2 worker processes through tfpar-launch with fixes turned
off. They pass only while upstream still has each defect; when one fails,
Keras fixed it, and the matching fix in compat.py can go.
"""

import json
import os
import subprocess
import sys

import pytest

from tfpar.kerasfix import compat

HERE = os.path.dirname(os.path.abspath(__file__))


def launch_two_workers(tmp_path, *args, env=None, timeout=240, script="mw_keras_fit.py"):
    cmd = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", str(timeout - 20), "--",
           sys.executable, os.path.join(HERE, script), str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr


def test_every_fix_names_its_upstream_issue_and_is_needed_by_this_keras():
    assert compat.NAMES == ("symbolic_build_reduce", "scalar_log_reduce", "bn_moving_stats_mean",
                            "loss_scale_finite_agreement", "model_save_chief_only", "model_checkpoint_chief_only",
                            "backup_resume_step", "backup_chief_only", "parameter_server_fit")
    assert [f.upstream for f in compat.FIXES][:2] == ["keras-team/keras#20585", "tensorflow/tensorflow#72388"]
    assert all(f.present() for f in compat.FIXES)  # Keras 3.15 still has all of them


def test_apply_is_idempotent_and_wraps_each_function_once():
    from keras.src.backend.tensorflow import trainer

    first = compat.apply()
    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    assert compat.apply() == first == sorted(compat.NAMES)
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is build and trainer.reduce_per_replica is reduce
    # The detection reads the original Keras code, so it still sees the defect after patching.
    assert all(f.present() for f in compat.FIXES)


def test_disable_env_is_checked():
    with pytest.raises(ValueError, match="unknown fix\\(es\\) typo; accepted: all, symbolic_build_reduce"):
        compat.apply({compat.DISABLE_ENV: "typo"})


def test_a_fixed_keras_is_left_alone(monkeypatch):
    monkeypatch.setattr(compat, "_applied", set())
    fixes = [compat.Fix(f.name, f.upstream, f.summary, lambda: False, lambda: pytest.fail("installed"))
             for f in compat.FIXES]
    monkeypatch.setattr(compat, "FIXES", tuple(fixes))
    assert compat.apply({}) == []


def test_fixes_leave_single_worker_training_unchanged():
    """Patched functions delegate to Keras outside multi-worker mode: plain and mirrored fits still work."""
    import keras
    import numpy as np
    import tensorflow as tf

    compat.apply()
    x, y = np.random.RandomState(0).normal(size=(64, 4)).astype("float32"), np.zeros((64,), "int32")
    for strategy in (None, tf.distribute.MirroredStrategy(["/cpu:0"])):
        scope = strategy.scope() if strategy else tf.name_scope("plain")
        with scope:
            model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert history.history["loss"][1] < history.history["loss"][0]
        bn = model.layers[0]
        assert bn.moving_mean.aggregation == "none"  # BN fix touches only multi-worker variables


@pytest.mark.slow
def test_upstream_fit_fails_under_multi_worker_without_the_fixes(tmp_path):
    code, out = launch_two_workers(tmp_path, "--raw")
    assert code != 0
    assert "Attempt to convert a value (PerReplica" in out  # keras-team/keras#20585


@pytest.mark.slow
def test_scalar_log_reduce_is_needed_once_the_build_is_fixed(tmp_path):
    code, out = launch_two_workers(tmp_path, env={compat.DISABLE_ENV: "scalar_log_reduce"})
    assert code != 0
    assert "Invalid reduction dimension 0 for input with 0 dimensions" in out  # tensorflow/tensorflow#72388


@pytest.mark.slow
def test_without_the_bn_fix_workers_end_with_different_weights(tmp_path):
    code, out = launch_two_workers(tmp_path, env={compat.DISABLE_ENV: "bn_moving_stats_mean"})
    assert code == 0, out[-3000:]
    sums = [json.loads((tmp_path / f"worker-{i}.json").read_text())["weights_sha256"] for i in range(2)]
    assert sums[0] != sums[1]  # each worker kept its own moving statistics


@pytest.mark.slow
def test_float16_overflow_on_one_worker_is_skipped_by_both(tmp_path):
    code, out = launch_two_workers(tmp_path, script="mw_fp16_overflow.py", timeout=200)
    assert code == 0, out[-3000:]
    results = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(2)]
    assert results[0] == results[1]  # same skipped steps, scale and weights on both workers
    # 4 steps; the two that held worker 1's scaled batch were skipped and halved the scale twice.
    assert results[0]["applied_steps"] == 2 and results[0]["loss_scale"] == 2.0**15 / 4
    assert results[0]["all_finite"]


@pytest.mark.slow
def test_without_the_loss_scale_fix_one_overflowing_worker_hangs_the_job(tmp_path):
    # Bounded by the launcher's --timeout: exit 124 means the workers were stuck.
    code, out = launch_two_workers(tmp_path, script="mw_fp16_overflow.py", timeout=60,
                                   env={compat.DISABLE_ENV: "loss_scale_finite_agreement"})
    assert code == 124, out[-3000:]
    assert not (tmp_path / "worker-0.json").exists()
