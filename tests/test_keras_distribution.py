"""Keras's own ``keras.distribution`` API on TensorFlow after ``tfpar.compat.apply()`` (issue 27).

The training checks run once in a subprocess with 4 logical CPUs
(tests/keras_distribution_worker.py; logical devices must be set before
TensorFlow starts) and each test asserts one part of its result. Equivalence:
3 SGD-momentum steps of plain ``fit`` against one device from the same
weights, losses at rtol 1e-5 and weights within 1e-6 (observed: 6e-8).
"""

import json
import os
import sys

import numpy as np
import pytest

from helpers import quiet_env, run_reaped, run_together

from tfpar.kerasfix import compat

HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_fix_can_be_disabled_by_name_and_typos_are_refused():
    assert compat.disabled({compat.DISABLE_ENV: "keras_distribution_tf"}) == {"keras_distribution_tf"}
    assert "keras_distribution_tf" in compat.disabled({compat.DISABLE_ENV: "all"})
    with pytest.raises(ValueError, match="accepted: all, symbolic_build_reduce.*keras_distribution_tf"):
        compat.disabled({compat.DISABLE_ENV: "keras_distribution"})


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("keras_distribution") / "result.json"
    code, log, _ = run_reaped([sys.executable, os.path.join(HERE, "keras_distribution_worker.py"), str(out),
                               "--gemma"], 1200, env=quiet_env(KERAS_BACKEND="tensorflow"), merge_output=True)
    assert code == 0, log[-4000:]
    return json.loads(out.read_text())


def _equivalent(run):
    assert len(run["losses"]) == len(run["reference"]) == 3
    assert run["reference"][0] != run["reference"][1] != run["reference"][2]  # the steps change the model
    np.testing.assert_allclose(run["losses"], run["reference"], rtol=1e-5)
    assert run["max_weight_diff"] < 1e-6


@pytest.mark.slow
def test_data_parallel_through_set_distribution_trains_like_one_device_with_replicated_weights(result):
    assert result["applied"] and result["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    run = result["data_parallel"]
    _equivalent(run)
    assert all(all(a is None for a in spec) for spec in run["specs"].values())
    assert run["local_shapes"] == [[8, 16]] * 4  # a whole copy on each of the 4 devices


@pytest.mark.slow
def test_model_parallel_in_scope_lays_out_variables_and_slots_by_the_map(result):
    run = result["model_parallel"]
    _equivalent(run)
    assert run["specs"] == {"d1/kernel": [None, "model"], "d1/bias": ["model"], "d2/kernel": ["model", None],
                            "d2/bias": [None]}
    assert run["slots"] == {"d1_kernel_momentum": [None, "model"]}  # the optimizer slot follows its variable
    assert run["local_shapes"] == [[8, 8]] * 4  # 16 columns over model=2
    assert result["after_scope"]  # leaving scope() restores no distribution
    assert result["after_none"] == "ResourceVariable"  # set_distribution(None): plain Keras again


@pytest.mark.slow
def test_the_keras_io_guide_code_path_runs_on_tensorflow(result):
    guide = result["guide"]
    assert guide["tensor_layout"] == "['data', 'unsharded']"
    assert guide["data_parallel_history"][1] < guide["data_parallel_history"][0]
    assert guide["model_parallel_history"][1] < guide["model_parallel_history"][0]
    assert np.isfinite(guide["model_parallel_evaluate"])
    assert guide["d1_kernel_spec"] == [None, "model"]
    assert guide["checkpoint_files"] == ["backup", "best.weights.h5"]  # ModelCheckpoint, BackupAndRestore


@pytest.mark.slow
def test_keras_hub_gemma_with_its_own_layout_map_trains_like_one_device(result):
    gemma = result["gemma"]
    _equivalent(gemma)
    assert gemma["query_spec"] == ["model", "batch", None]  # FSDP-style: weights split over batch too
    assert gemma["embedding_spec"] == ["model", "batch"]


@pytest.mark.slow
def test_whole_values_predict_any_length_and_direct_calls(result):
    whole = result["whole"]
    assert whole["load_bit_exact"] and whole["model_save_bit_exact"]  # saved under 2x2, loaded unsharded
    assert whole["plain_is_tf_variable"] == "ResourceVariable"
    assert whole["predict_13_shape"] == [13, 4]
    for key in ("predict_13_diff", "call_diff", "call_13_diff", "predict_on_batch_diff"):
        assert whole[key] < 1e-6, key
    assert whole["test_on_batch"][0] == pytest.approx(whole["test_on_batch"][1], rel=1e-6)
    assert whole["train_on_batch_finite"] and whole["train_on_batch_steps"] == 1


@pytest.mark.slow
def test_mixed_bfloat16_keeps_float32_weights(result):
    bf16 = result["bf16"]
    assert bf16["weight_dtype"] == "float32"
    np.testing.assert_allclose(bf16["losses"], bf16["reference"], rtol=2e-2)


@pytest.mark.slow
def test_what_cannot_be_honoured_is_one_sentence(result):
    bad = result["bad"]
    assert bad["error_type"] == "ValueError"
    assert bad["unknown_axis"].startswith("ValueError: Invalid axis names for Layout.")  # Keras's own check
    assert bad["uneven"] == ("ValueError: rule 'd2/bias' on variable 'd2/bias' [3]: dimension 3 does not divide "
                             "evenly over mesh axis 'model' of size 2.")
    assert bad["mesh_too_big"] == ("DistributionError: The DeviceMesh batch=8 needs 8 CPU devices (cpu:0, cpu:1, "
                                   "cpu:2, cpu:3, cpu:4, cpu:5, cpu:6, cpu:7) but 4 exist; use "
                                   "keras.distribution.list_devices() to build it.")
    assert bad["process_id"] == ("DistributionError: initialize got process_id=2, but with num_processes=2 it "
                                 "must be 0 to 1.")
    assert bad["built_before"] == (
        "DistributionError: The model's variable 'd1/kernel' was created before DataParallel was set; build the "
        "model after keras.distribution.set_distribution(...) or inside distribution.scope().")
    assert bad["custom"] == ("DistributionError: Custom is not supported by tfpar on TensorFlow; use "
                             "keras.distribution.DataParallel or ModelParallel.")


# ----- two processes x 2 logical CPUs, one 2x2 mesh ---------------------------------------------
def _two_processes_agree(out_dir):
    results = [json.loads((out_dir / f"{i}.json").read_text()) for i in range(2)]
    for index, run in enumerate(results):
        assert run["process"] == index and run["num_processes"] == 2 and run["multi_process"]
        assert run["devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]  # list_devices is global
        assert run["local_shapes"] == [[8, 8]] * 2  # each process holds its 2 column halves of d1/kernel
        _equivalent(run)  # each fed its half of every batch, yet the losses are the global batch's
    assert results[0]["weights_sum"] == results[1]["weights_sum"]


@pytest.mark.slow
def test_initialize_with_addresses_trains_one_mesh_over_two_processes(tmp_path):
    from tfpar.runtime import launcher

    jobs = ",".join(f"127.0.0.1:{p}" for p in launcher.free_ports(2))
    codes, logs = run_together(
        [[sys.executable, os.path.join(HERE, "keras_distribution_worker.py"), "--process", str(index), jobs,
          str(tmp_path)] for index in range(2)], [quiet_env()] * 2, timeout=600)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    _two_processes_agree(tmp_path)


@pytest.mark.slow
def test_initialize_without_arguments_reads_the_cluster_from_tfpar_launch(tmp_path):
    code, out, _ = run_reaped(
        [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "600", "--", sys.executable,
         os.path.join(HERE, "keras_distribution_worker.py"), "--process", "launched", str(tmp_path)],
        700, env=quiet_env(), merge_output=True)
    assert code == 0, out[-3000:]
    _two_processes_agree(tmp_path)


# ----- tfpar-train --layout_map -----------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--layout_map=no_such_module_27:f"],
     "layout_map 'no_such_module_27:f' cannot be loaded (ModuleNotFoundError: No module named 'no_such_module_27')."),
    (["--layout_map=builtins:repr"], "layout_map 'builtins:repr' returned str, not a keras.distribution.LayoutMap."),
    (["--layout_map=a map"], "layout_map must be module:function (a Keras LayoutMap factory such as "
                             "keras_hub.models:GemmaBackbone.get_layout_map) or a JSON file, got 'a map'."),
    (["--layout_map=builtins:repr", "--layout_rules={rules}"], "Give --layout_map or --layout_rules, not both."),
])
def test_cli_layout_map_mistakes_exit_2_with_one_sentence(tmp_path, capsys, args, message):
    from tfpar.run import cli

    rules = tmp_path / "rules.json"
    rules.write_text("{}")
    code = cli.main(["tfpar-train", "--strategy=dtensor", "--mesh=batch=1,model=1", "--model=vgg11",
                     f"--model_dir={tmp_path / 'run'}", *[a.format(rules=rules) for a in args]])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tfpar-train: error: ")]
    assert code == 2 and lines == [f"tfpar-train: error: {message}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_trains_with_a_keras_layout_map_factory(tmp_path):
    env = quiet_env(PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    code, out, err = run_reaped(
        [sys.executable, "-m", "tfpar.cli", "--strategy=dtensor", "--mesh=batch=2,model=2", "--virtual_cpus=4",
         "--model=vgg11", "--width_multiplier=0.125", "--layout_map=layout_maps:vgg_columns", "--epochs=1",
         "--steps_per_epoch=2", "--validation_steps=1", "--batch_size=16", f"--model_dir={tmp_path}", "--verbose=0",
         "--notensorboard"], 600, env=env)
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layout_rules"] == [["fc1/kernel", [None, "model"]], ["fc1/bias", ["model"]],
                                       ["fc2/kernel", ["model", None]]]
    assert summary["optimizer_updates"] == 2 and 0 < summary["param_bytes_per_device"] < summary["param_bytes"]
