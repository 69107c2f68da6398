"""Plain Keras 3 ``model.fit``/``evaluate`` under ``ParameterServerStrategy`` (tfpar.kerasfix.ps_fit).

chief + 2 workers + 1 ps through ``tfpar-launch --ps 1``; the chief runs
tests/ps_keras_fit.py, a user's script with ``tfpar.compat.apply()`` and a
strategy it builds itself. A killed worker under this same path is tested in
tests/test_parameter_server.py (tfpar-train trains with ``model.fit`` now).
"""

import json
import os
import sys

import pytest

from helpers import run_reaped

from tfpar.kerasfix import compat

HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(tmp_path, *args, env=None, timeout=300):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--ps", "1", "--timeout", str(timeout - 30),
               "--", sys.executable, os.path.join(HERE, "ps_keras_fit.py"), str(out), *args]
    code, text, _ = run_reaped(command, timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
                               merge_output=True)
    return code, text, out


def test_the_fix_is_registered_and_needed_by_this_keras():
    fix = {f.name: f for f in compat.FIXES}[compat.PS_FIT]
    assert fix.upstream == "keras-team/keras#18624" and fix.present()


@pytest.mark.slow
def test_keras_fit_and_evaluate_under_a_user_built_ps_strategy(tmp_path):
    code, text, out = _launch(tmp_path)
    assert code == 0, text[-6000:]
    result = json.loads(out.read_text())

    tutorial = result["tutorial"]  # the official tutorial's model.fit cell
    assert len(tutorial["loss"]) == 5 and tutorial["loss"][-1] < tutorial["loss"][0], tutorial
    assert tutorial["iterations"] == 100 and tutorial["checkpoint_equal"], tutorial
    assert tutorial["log_dir"] == ["train"] and tutorial["working_dir"] == ["ckpt.keras", "log"], tutorial

    run = result["dataset"]
    steps, epochs, examples = 9, 4, 9 * 32
    # Exact bookkeeping: 9 steps per epoch as 4 functions of 2 steps and 1 of 1 (steps_per_execution=2).
    assert [e["iterations"] for e in run["epochs"]] == [9, 18, 27, 36]
    assert [e["batch_ends"] for e in run["epochs"]] == [5] * epochs
    for e in run["epochs"]:  # accuracy over exactly 288 examples: a whole number of them right
        assert abs(e["logs"]["accuracy"] * examples - round(e["logs"]["accuracy"] * examples)) < 1e-3, e
    losses = run["history"]["loss"]
    assert len(losses) == epochs and losses[-1] < losses[0] * 0.9, losses
    assert {"val_loss", "val_accuracy"} <= set(run["history"])
    # evaluate after the last epoch reads the same variables as its validation
    assert run["evaluate"]["loss"] == pytest.approx(run["history"]["val_loss"][-1], rel=1e-5)
    assert run["evaluate_list"] == [run["evaluate"]["loss"], run["evaluate"]["accuracy"]]
    assert run["weights_on"] == ["/job:ps/replica:0/task:0/device:CPU:0"]

    # Keras's BackupAndRestore with a function of an InputContext: interrupted before epoch 3, resumed
    # by a fresh model, which starts from the saved weights and optimizer state at epoch 3.
    assert result["interrupted"] == "interrupted"
    assert result["backup_files"] == ["latest.weights.h5", "training_metadata.json"]
    resume = result["resume"]
    assert resume["first_epochs"] == [0, 1] and resume["second_epochs"] == [2, 3]
    assert resume["restored_equal_saved"]
    assert resume["begin_iterations"] == 2 * steps and resume["iterations"] == [27, 36]
    assert resume["loss"][-1] < resume["loss"][0] * 0.9, resume["loss"]
    assert not resume["backup_dir_left"]  # delete_checkpoint=True after a finished fit

    steps_backup = result["resume_steps"]  # save_freq=4, double_checkpoint=True
    assert steps_backup["files"] == ["latest.weights.h5", "latest.weights.h5.bkp", "training_metadata.json",
                                     "training_metadata.json.bkp"], steps_backup
    resumed_at = steps_backup["metadata"]["epoch"]
    assert resumed_at in (1, 2) and steps_backup["second_epochs"] == list(range(resumed_at, epochs)), steps_backup
    assert steps_backup["iterations"] == [steps * (e + 1) for e in range(resumed_at, epochs)], steps_backup
    assert steps_backup["kept"] == steps_backup["files"]  # delete_checkpoint=False

    custom = result["custom_step"]  # its own train_step on the workers, test_step on the chief
    assert custom["iterations"] == 3 * steps and custom["history_keys"] == ["accuracy", "loss"], custom
    assert custom["after"]["loss"] < custom["before"]["loss"] * 0.9, custom
    assert 0.0 <= custom["after"]["accuracy"] <= 1.0 and custom["after"]["accuracy"] * 96 == pytest.approx(
        round(custom["after"]["accuracy"] * 96), abs=1e-3), custom  # 96 validation examples, on the chief

    assert "needs steps_per_epoch" in result["errors"]["no_steps"]
    assert "takes a tf.data.Dataset or a function input_context -> tf.data.Dataset; got ndarray" in (
        result["errors"]["arrays"])


@pytest.mark.slow
def test_upstream_keras_fit_fails_under_ps_without_the_fix(tmp_path):
    code, text, out = _launch(tmp_path, "upstream", env={compat.DISABLE_ENV: compat.PS_FIT}, timeout=240)
    assert code == 0, text[-4000:]
    failures = json.loads(out.read_text())
    assert "you need to pass this dataset to ClusterCoordinator.create_per_worker_dataset" in failures["dataset"]
    assert failures["function"].startswith("Unrecognized data type: x=<function dataset_fn")
