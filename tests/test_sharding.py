"""DTensor sharding: meshes, layout rules, the VGG16 memory plan, and sharded training.

The training checks run once in a subprocess with 4 virtual CPUs
(tests/sharding_worker.py) and each test below asserts one part of its
result. Tolerances: float32 losses and weights of a sharded run match an
unsharded Keras run to 1e-4 (relative) / 1e-4 (absolute) after 3 steps of
plain ``fit`` (SGD momentum, Adam); observed: 1e-7 for SGD.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import quiet_env, run_reaped, run_together

from tfpar.parallel import sharding
from tfpar.parallel.sharding import meshes, report
from tfpar.parallel.sharding import rules as rules_lib

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


def test_default_rules_degrade_and_say_so_where_the_same_user_rules_fail():
    defaults = sharding.default_rules("vgg16")
    user = list(defaults)
    uneven = {"batch": 1, "model": 4}
    assert rules_lib.resolve_noted(defaults, "predictions/kernel", (64, 10), uneven) == (
        (None, None), "replicated: dimension 10 does not divide evenly over 'model' of size 4")
    assert rules_lib.resolve_noted(defaults, "fc1/kernel", (64, 64), uneven) == ((None, "model"), None)
    with pytest.raises(ValueError, match="dimension 10 does not divide evenly over mesh axis 'model' of size 4"):
        rules_lib.resolve(user, "predictions/kernel", (64, 10), uneven)
    no_model = {"batch": 4}
    assert rules_lib.resolve_noted(defaults, "fc1/kernel", (64, 64), no_model) == (
        (None, None), "replicated: the mesh has no axis 'model'")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'; the mesh has batch"):
        rules_lib.resolve(user, "fc1/kernel", (64, 64), no_model)
    rows = report.plan(lambda: __import__("tfpar.models", fromlist=["build"]).build(
        "vgg11", num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125), defaults, uneven)
    assert report.adaptations(rows) == ["Default layout rules on this mesh: predictions/kernel, predictions/bias "
                                        "replicated: dimension 10 does not divide evenly over 'model' of size 4."]


def test_a_keras_layout_map_is_read_as_rules():
    import keras

    layout_map = keras.distribution.LayoutMap(keras.distribution.DeviceMesh(
        (2, 2), ["batch", "model"], devices=[f"cpu:{i}" for i in range(4)]))  # names only; no devices needed
    layout_map["fc1/kernel"] = (None, "model")
    layout_map[r".*conv\d/kernel"] = keras.distribution.TensorLayout((None, None, None, "model"))
    assert [(r.pattern, spec) for r, spec in rules_lib.normalize(layout_map)] == [
        ("fc1/kernel", (None, "model")), (r".*conv\d/kernel", (None, None, None, "model"))]
    assert rules_lib.resolve(layout_map, "block1_conv1/kernel", (3, 3, 3, 8), MESH) == (None, None, None, "model")
    with pytest.raises(ValueError, match="does not divide evenly"):  # a LayoutMap is the user's: strict
        rules_lib.resolve(layout_map, "fc1/kernel", (64, 33), MESH)


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
    from tfpar.runtime.cluster import ClusterInfo
    from tfpar.run.hooks.dtensor import dtensor_env_from_cluster

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
        log, _ = proc.communicate(timeout=1800)  # 11.5 minutes on a 2-core machine at load 18
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.read_text())


MESHES = ["batch=4,model=1", "batch=2,model=2", "batch=1,model=4"]
RUNS = [f"rules {opt} {spec}" for spec in MESHES for opt in ("sgd", "adam")] + [f"layout_map adam {spec}" for spec in MESHES]


@pytest.mark.slow
@pytest.mark.parametrize("run_name", RUNS)
def test_plain_fit_in_layout_scope_matches_unsharded_step_by_step(worker_result, run_name):
    run = worker_result["runs"][run_name]
    reference = worker_result["reference"][run_name.split()[1]]
    assert len(run["losses"]) == len(reference) == 3
    assert reference[0] != reference[1] != reference[2]  # the steps do change the model
    np.testing.assert_allclose(run["losses"], reference, rtol=1e-4)
    assert run["max_weight_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("run_name", RUNS)
def test_shards_are_one_nth_and_slots_follow_their_weight(worker_result, run_name):
    model = meshes.parse(run_name.split()[2])["model"]
    run = worker_result["runs"][run_name]
    shapes = run["shapes"]
    for path, axis in [("fc1/kernel", 1), ("fc2/kernel", 0), ("predictions/kernel", 1), ("block1_conv1/kernel", 3)]:
        full, local = shapes[path]
        expected = list(full)
        expected[axis] //= model
        assert local == [expected] * 4, path
    for path in ("fc2/bias", "block1_conv1_bn/gamma"):
        full, local = shapes[path]
        assert local == [full] * 4
    slots = run["slot_shapes"]
    names = ["momentum"] if " sgd " in run_name else ["momentum", "velocity"]  # Adam: two moments
    for name in names:
        assert slots[f"fc1_kernel_{name}"] == shapes["fc1/kernel"][1]
        assert slots[f"fc2_bias_{name}"] == shapes["fc2/bias"][1]


@pytest.mark.slow
def test_layout_map_values_become_the_specs(worker_result):
    specs = worker_result["runs"]["layout_map adam batch=2,model=2"]["specs"]
    assert specs == {"fc1/kernel": [None, "model"], "predictions/kernel": [None, "model"],
                     "block2_conv1/kernel": [None, None, None, "model"]}


@pytest.mark.slow
def test_save_weights_from_2x2_loads_unsharded_and_into_1x4(worker_result):
    saved = worker_result["save_weights"]
    assert saved["saved_matches_reference"]
    assert saved["unsharded_equal"] and saved["1x4_equal"]
    assert saved["1x4_fc1_local_shapes"] == [[64, 16]] * 4  # [64, 64] split in 4 columns, not 2
    loss_plain, loss_1x4 = saved["next_step_losses"]
    assert loss_1x4 == pytest.approx(loss_plain, rel=1e-4)  # the loaded model trains on as the unsharded one


@pytest.mark.slow
def test_fit_callbacks_evaluate_and_predict_are_keras_own(worker_result):
    fit = worker_result["fit"]
    assert len(fit["history"]["loss"]) == 2 and len(fit["history"]["val_loss"]) == 2
    assert {"epoch_loss", "epoch_accuracy"} <= set(fit["tags"])
    assert fit["evaluate"]["loss"] == pytest.approx(fit["history"]["val_loss"][-1])
    # 13 images = 8 + a short 5 (run replicated): exactly what unsharded Keras computes.
    assert fit["evaluate_before"]["loss"] == pytest.approx(fit["evaluate_plain"]["loss"], rel=1e-5)
    assert fit["evaluate_before"]["accuracy"] == fit["evaluate_plain"]["accuracy"]
    assert fit["predict_diff"] < 1e-5
    assert fit["iterations"] == 4  # 2 epochs x 2 steps
    assert fit["checkpoint_equal"]  # ModelCheckpoint's weights file holds the final sharded weights


@pytest.mark.slow
def test_sharded_trainer_checkpoint_restores_equal_values_in_the_same_layouts(worker_result):
    ckpt = worker_result["checkpoint"]
    assert ckpt["moved"] > 0
    assert ckpt["restored_equal"] and ckpt["fresh_equal"] and ckpt["fresh_slots_equal"]
    assert ckpt["fresh_fc1_local_shapes"] == [[64, 32]] * 4
    assert ckpt["iterations"] == 3


@pytest.mark.slow
def test_default_rules_degrade_where_user_rules_fail(worker_result):
    defaults = worker_result["defaults"]
    uneven = defaults["batch=1,model=4"]
    assert uneven["specs"] == {"predictions/kernel": [None, None], "fc1/kernel": [None, "model"]}
    assert uneven["finite"] and uneven["moved"] > 0
    assert uneven["notes"] == ["Default layout rules on this mesh: predictions/kernel, predictions/bias replicated: "
                               "dimension 10 does not divide evenly over 'model' of size 4."]
    assert "rule 'predictions/kernel$' on variable 'predictions/kernel' [64, 10]: dimension 10 does not divide " \
           "evenly over mesh axis 'model' of size 4." == uneven["user_error"]
    no_model = defaults["batch=4"]
    assert no_model["specs"] == {"predictions/kernel": [None, None], "fc1/kernel": [None, None]}
    assert no_model["finite"] and no_model["moved"] > 0
    assert len(no_model["notes"]) == 1 and "replicated: the mesh has no axis 'model'" in no_model["notes"][0]
    assert no_model["user_error"].endswith("unknown mesh axis 'model'; the mesh has batch.")


@pytest.mark.slow
def test_mixed_bfloat16_trains_with_float32_weights(worker_result):
    bf16 = worker_result["precision"]["mixed_bfloat16 batch=2,model=2"]
    assert bf16["weight_dtypes"] == ["float32"] and bf16["optimizer"] == "SGD"
    np.testing.assert_allclose(bf16["losses"], bf16["reference"], rtol=2e-2)  # same weights, bf16 rounding


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["batch=1,model=4", "batch=2,model=2"])
def test_mixed_float16_scales_the_loss_as_keras_does(worker_result, spec):
    fp16 = worker_result["precision"][f"mixed_float16 {spec}"]
    assert fp16["optimizer"] == "LossScaleOptimizer" and fp16["weight_dtypes"] == ["float32"]
    assert fp16["iterations"] == 3  # no step skipped: the updates really ran in float16 compute
    assert fp16["scale"] == fp16["reference_scale"]
    np.testing.assert_allclose(fp16["losses"], fp16["reference"], rtol=1e-2)
    assert fp16["max_weight_diff"] < 1e-2


@pytest.mark.slow
def test_mesh_that_does_not_match_the_devices_is_a_clear_error(worker_result):
    assert worker_result["mesh_error"] == (
        "Mesh batch=3,model=1 needs 3 CPU devices but this process has 4; make the axis sizes multiply to 4."
    )


# ----- tfpar-train --strategy=dtensor ---------------------------------------
def _cli(args, timeout=600):
    return run_reaped([sys.executable, "-m", "tfpar.cli", *args], timeout, env=quiet_env())


@pytest.mark.slow
def test_cli_default_rules_adapt_to_a_mesh_they_do_not_fit(tmp_path):
    # 10 classes on model=4: the classifier is replicated (and the plan says so); the rest is split.
    code, out, err = _cli(["--strategy=dtensor", "--mesh=batch=1,model=4", "--virtual_cpus=4", "--model=vgg11",
                           "--width_multiplier=0.125", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
                           "--batch_size=16", f"--model_dir={tmp_path}", "--verbose=0"])
    assert code == 0, err[-3000:]
    assert ("Default layout rules on this mesh: predictions/kernel, predictions/bias replicated: "
            "dimension 10 does not divide evenly over 'model' of size 4.") in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "DTensor batch=1,model=4" and summary["mesh"] == {"batch": 1, "model": 4}
    assert summary["optimizer_updates"] == 3 and summary["replicas"] == 1
    assert 0 < summary["param_bytes_per_device"] < summary["param_bytes"]
    assert np.isfinite(summary["val_loss"])
    assert (tmp_path / "best.weights.h5").exists()  # Keras save_weights on sharded weights


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--mesh=batch=3,model=1", "--batch_size=12"], "Mesh batch=3,model=1 needs 3 CPU devices but this process has 4"),
    (["--mesh=batch=1,model=4", "--batch_size=16", "--layout_rules={rules}"],
     "rule 'predictions/kernel$' on variable 'predictions/kernel' [64, 10]: dimension 10 does not divide evenly "
     "over mesh axis 'model' of size 4."),
])
def test_cli_mesh_and_user_rule_errors_exit_2_with_one_line(tmp_path, args, message):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"predictions/kernel$": "_,model"}))
    args = [a.format(rules=rules) for a in args]
    code, out, err = _cli(["--strategy=dtensor", "--virtual_cpus=4", "--model=vgg11", "--width_multiplier=0.125",
                           f"--model_dir={tmp_path / 'run'}", *args], timeout=300)
    assert code == 2, err[-3000:]
    assert "tfpar-train: error: " in err and message in err
    assert "Traceback" not in err


# ----- two DTensor clients on 127.0.0.1 --------------------------------------
@pytest.mark.slow
def test_two_dtensor_clients_train_one_2x2_mesh_like_plain_keras(tmp_path):
    from tfpar.runtime import launcher

    ports = launcher.free_ports(2)
    jobs = ",".join(f"127.0.0.1:{p}" for p in ports)
    codes, logs = run_together(
        [[sys.executable, os.path.join(HERE, "sharding_worker.py"), "--client", str(tmp_path / f"{client}.json")]
         for client in range(2)],
        [quiet_env(DTENSOR_CLIENT_ID=str(client), DTENSOR_NUM_CLIENTS="2", DTENSOR_JOB_NAME="worker",
                   DTENSOR_JOBS=jobs) for client in range(2)], timeout=600)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = [json.loads((tmp_path / f"{c}.json").read_text()) for c in range(2)]
    for client, result in enumerate(results):
        assert result["client"] == client and result["clients"] == 2
        assert result["local_devices"] == 2 and result["global_devices"] == 4
        assert result["fc1_local_shapes"] == [[64, 32]] * 2  # each client holds its 2 halves
        np.testing.assert_allclose(result["losses"], result["reference"], rtol=1e-4)
        assert result["max_weight_diff"] < 1e-4
    assert results[0]["weights_sum"] == results[1]["weights_sum"]
    assert results[0]["evaluate"] == results[1]["evaluate"]


@pytest.mark.slow
def test_tfpar_launch_two_workers_train_one_dtensor_mesh(tmp_path):
    # TF_CONFIG from tfpar-launch becomes DTENSOR_* (chief first); each worker has 2 of the mesh's 4 devices.
    code, out, err = run_reaped(
        [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "600", "--",
         sys.executable, "-m", "tfpar.cli", "--strategy=dtensor", "--mesh=batch=2,model=2", "--virtual_cpus=2",
         "--model=vgg11", "--width_multiplier=0.125", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
         "--batch_size=16", f"--model_dir={tmp_path}", "--verbose=0"], 700, env=quiet_env(), merge_output=True)
    assert code == 0, out[-3000:]
    summaries = [json.loads((tmp_path / f"summary.worker-{i}.json").read_text()) for i in range(2)]
    assert [s["task"] for s in summaries] == ["worker-0", "worker-1"]
    for s in summaries:
        assert s["mesh"] == {"batch": 2, "model": 2} and s["optimizer_updates"] == 3
        assert 0 < s["param_bytes_per_device"] < s["param_bytes"]
    assert summaries[0]["weights_sha256"] == summaries[1]["weights_sha256"]  # one model, whole on both clients
