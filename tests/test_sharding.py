"""DTensor sharding: meshes, layout rules, the VGG16 memory plan, and sharded training.

The training checks run once in a subprocess with 4 virtual CPUs
(tests/sharding_worker.py) and each test below asserts one part of its
result. Tolerances: float32 losses and weights of a sharded run match an
unsharded Keras run to 1e-4 (relative) / 1e-4 (absolute) after 3 SGD-momentum
steps; observed differences are about 2e-6.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import quiet_env, run_reaped

from tfpar import sharding
from tfpar.sharding import meshes, report
from tfpar.sharding import rules as rules_lib

HERE = os.path.dirname(os.path.abspath(__file__))
MESH = {"batch": 2, "model": 2}


# ----- pure Python: meshes and rules ---------------------------------------
def test_mesh_parse_keeps_order_and_rejects_bad_text():
    assert list(meshes.parse("batch=2, model=2").items()) == [("batch", 2), ("model", 2)]
    for bad, words in [("batch=2,model", "NAME=SIZE"), ("batch=0", "positive"), ("b=2,b=2", "twice"),
                       ("", "batch=2,model=2"), ("2x=2", "identifier")]:
        with pytest.raises(ValueError, match=words):
            meshes.parse(bad)


def test_first_matching_rule_wins_and_unmatched_is_replicated():
    rules = [(r"fc1/kernel$", "_,model"), (r"kernel$", ["model", None])]
    assert rules_lib.resolve(rules, "fc1/kernel", (64, 32), MESH) == (None, "model")
    assert rules_lib.resolve(rules, "fc2/kernel", (64, 32), MESH) == ("model", None)
    assert rules_lib.resolve(rules, "fc2/bias", (32,), MESH) == (None,)


@pytest.mark.parametrize("rule,shape,words", [
    ((r"kernel", (None, "model")), (64, 33), "dimension 33 does not divide evenly over mesh axis 'model' of size 2"),
    ((r"kernel", ("model",)), (64, 32), "has 1 entries but the variable has 2"),
    ((r"kernel", (None, "tensor")), (64, 32), "unknown mesh axis 'tensor'"),
    ((r"kernel", ("model", "model")), (64, 32), "only one dimension"),
])
def test_bad_rules_give_one_clear_error(rule, shape, words):
    with pytest.raises(ValueError, match=words):
        rules_lib.resolve([rule], "fc1/kernel", shape, MESH)


def test_rules_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"fc1/kernel$": "_,model", "fc2/kernel$": ["model", None]}))
    rules = sharding.load_rules(str(path))
    assert [(r.pattern, s) for r, s in rules] == [("fc1/kernel$", (None, "model")), ("fc2/kernel$", ("model", None))]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharding.load_rules(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        sharding.load_rules(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="does not compile"):
        rules_lib.normalize({"fc1/(kernel": "_,model"})


def test_vgg16_plan_halves_the_big_layers():
    from tfpar import models

    rows = report.plan(lambda: models.build("vgg16"), sharding.default_rules("vgg16"), MESH)
    by_path = {r["path"]: r for r in rows}
    assert by_path["fc1/kernel"]["device_shape"] == (25088, 2048)  # column-split
    assert by_path["fc2/kernel"]["device_shape"] == (2048, 4096)  # row-split
    assert by_path["predictions/kernel"]["device_shape"] == (4096, 500)  # classes
    assert by_path["block5_conv3/kernel"]["device_shape"] == (3, 3, 512, 256)
    assert by_path["fc2/bias"]["device_shape"] == (4096,)  # after the row split's all-reduce: whole
    totals = report.totals(rows)
    assert totals["param_bytes"] == 138_357_544 * 4
    replicated = sum(r["bytes"] for r in rows if not any(r["spec"]))
    assert replicated == 4 * (sum((64, 64, 128, 128, 256, 256, 256) + (512,) * 6) + 4096)  # conv biases + fc2 bias
    assert totals["param_bytes_per_device"] == (totals["param_bytes"] - replicated) // 2 + replicated
    table = report.markdown(rows, MESH, skip_replicated_below=1 << 16)
    assert "| `fc1/kernel` | [25088, 4096] | [·, model] | [25088, 2048] | 196.00 |" in table


def test_dtensor_env_from_tf_config_cluster():
    from tfpar.cluster import ClusterInfo
    from tfpar.sharding.driver import dtensor_env_from_cluster

    info = ClusterInfo(task_type="worker", task_index=0, num_workers=2, source="tf_config",
                       cluster_spec={"chief": ["h0:1000"], "worker": ["h1:1001"]})
    env = dtensor_env_from_cluster(info, {})
    assert env == {"DTENSOR_CLIENT_ID": "1", "DTENSOR_NUM_CLIENTS": "2", "DTENSOR_JOB_NAME": "worker",
                   "DTENSOR_JOBS": "h0:1000,h1:1001"}


# ----- sharded training on 4 virtual CPUs (one subprocess) -------------------
@pytest.fixture(scope="module")
def worker_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "result.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


MESHES = ["batch=4,model=1", "batch=2,model=2", "batch=1,model=4"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_losses_match_unsharded_step_by_step(worker_result, spec):
    run = worker_result["runs"][spec]
    reference = worker_result["reference"]
    assert len(run["losses"]) == len(reference) == 3
    assert reference[0] != reference[1] != reference[2]  # the steps do change the model
    np.testing.assert_allclose(run["losses"], reference, rtol=1e-4)
    assert run["max_weight_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_shards_are_one_nth_and_replicated_weights_whole(worker_result, spec):
    model = meshes.parse(spec)["model"]
    shapes = worker_result["runs"][spec]["shapes"]
    for path, axis in [("fc1/kernel", 1), ("fc2/kernel", 0), ("predictions/kernel", 1), ("block1_conv1/kernel", 3)]:
        full, local = shapes[path]
        expected = list(full)
        expected[axis] //= model
        assert local == [expected] * 4, path
    for path in ("fc2/bias", "block1_conv1_bn/gamma"):
        full, local = shapes[path]
        assert local == [full] * 4
    slots = worker_result["runs"][spec]["slot_shapes"]
    assert slots["fc1_kernel_momentum"] == shapes["fc1/kernel"][1]  # the slot follows its variable
    assert slots["fc2_bias_momentum"] == shapes["fc2/bias"][1]


@pytest.mark.slow
def test_checkpoint_restores_equal_values_in_the_same_layouts(worker_result):
    ckpt = worker_result["checkpoint"]
    assert ckpt["moved"] > 0
    assert ckpt["restored_equal"] and ckpt["fresh_equal"] and ckpt["fresh_slots_equal"]
    assert ckpt["fresh_fc1_local_shapes"] == [[64, 32]] * 4


@pytest.mark.slow
def test_fit_gives_history_tensorboard_scalars_and_padded_evaluation(worker_result):
    fit = worker_result["fit"]
    assert len(fit["history"]["loss"]) == 2 and len(fit["history"]["val_loss"]) == 2
    assert {"epoch_loss", "epoch_accuracy"} <= set(fit["tags"])
    assert fit["evaluate"]["loss"] == pytest.approx(fit["history"]["val_loss"][-1])
    # 13 validation images: accuracy is a multiple of 1/13, so the padded 3 were masked out.
    assert round(fit["evaluate"]["accuracy"] * 13, 6) == round(fit["evaluate"]["accuracy"] * 13)
    assert fit["iterations"] == 3 + 4  # 3 steps restored from the checkpoint + 2 epochs x 2 steps


@pytest.mark.slow
def test_mixed_bfloat16_trains_with_float32_weights(worker_result):
    bf16 = worker_result["bf16"]
    assert bf16["weight_dtypes"] == ["float32"]
    assert bf16["losses"][0] == pytest.approx(bf16["reference"][0], rel=1e-2)  # same weights, bf16 rounding
    assert all(np.isfinite(bf16["losses"]))


@pytest.mark.slow
def test_mesh_that_does_not_match_the_devices_is_a_clear_error(worker_result):
    assert worker_result["mesh_error"] == (
        "Mesh batch=3,model=1 needs 3 CPU devices but this process has 4; make the axis sizes multiply to 4."
    )


# ----- tfpar-train --strategy=dtensor ---------------------------------------
def _cli(args, timeout=600):
    return run_reaped([sys.executable, "-m", "tfpar.cli", *args], timeout, env=quiet_env())


@pytest.mark.slow
def test_cli_trains_on_a_mesh_and_reports_bytes_per_device(tmp_path):
    code, out, err = _cli(["--strategy=dtensor", "--mesh=batch=2,model=2", "--virtual_cpus=4", "--model=vgg11",
                           "--width_multiplier=0.125", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
                           "--batch_size=16", f"--model_dir={tmp_path}", "--verbose=0"])
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "DTensor batch=2,model=2" and summary["mesh"] == {"batch": 2, "model": 2}
    assert summary["optimizer_updates"] == 3 and summary["replicas"] == 2
    assert 0 < summary["param_bytes_per_device"] < summary["param_bytes"]
    assert np.isfinite(summary["val_loss"])
    assert (tmp_path / "best.weights.h5").exists()  # Keras save_weights on sharded weights


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--mesh=batch=3,model=1", "--batch_size=12"], "Mesh batch=3,model=1 needs 3 CPU devices but this process has 4"),
    (["--mesh=batch=1,model=4", "--batch_size=16"], "dimension 10 does not divide evenly over mesh axis 'model' of size 4"),
])
def test_cli_mesh_errors_exit_2_with_one_line(tmp_path, args, message):
    code, out, err = _cli(["--strategy=dtensor", "--virtual_cpus=4", "--model=vgg11", "--width_multiplier=0.125",
                           f"--model_dir={tmp_path}", *args], timeout=300)
    assert code == 2, err[-3000:]
    assert "tfpar-train: error: " in err and message in err
