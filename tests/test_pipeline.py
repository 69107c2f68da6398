"""Pipeline parallelism (tfpar.pipeline): cuts, balance, schedules, equivalence, placement, errors.

Training on several logical CPUs runs in subprocesses (tests/pipeline_worker.py),
once per mode, and each test below asserts one part of its result. The rest
runs here with every stage named on /cpu:0, which exercises the same code.

Tolerances. float32: the weights after 3 SGD-momentum steps match the
unsplit model to rtol 1e-5 + atol 1e-6 (observed: within 0.08 of that
bound; the summed micro-batch gradients differ from the full-batch gradient
by round-off only). mixed_bfloat16 keeps 8 mantissa bits: wherever the
split graph rounds or fuses an op differently from the unsplit one (a cut
between a convolution and its ReLU stops a fusion), a value moves by one
bfloat16 step, 0.4%, and 3 momentum steps on these small nets amplify a
perturbation about 40x (float32 round-off of ~1e-7 ends at ~4e-6 of the
update). So bfloat16 asserts the distance between the runs relative to how
far training moved the weights, ||pipe - ref|| / ||ref - start|| < 0.5
(observed 0.009-0.27), and where the graphs fuse alike (the Sequential model)
that it equals tfpar's accumulation over the same micro-batches exactly.
"""

import itertools
import json
import os
import re
import sys

import keras
import numpy as np
import pytest

from helpers import quiet_env, run_reaped, worker_json

from tfpar import models
from tfpar.parallel import pipeline
from tfpar.parallel.pipeline import balance, partition, schedules

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(name="alexnet", **kw):
    keras.utils.set_random_seed(0)
    return models.build(name, num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125, dropout=0.0, **kw)


# ----- cuts, balance and schedules (pure) -----------------------------------
def test_every_builder_is_cuttable_and_resnet_only_between_blocks():
    for name in ("alexnet", "vgg16_bn", "resnet18", "resnet50"):
        names = partition.cut_names(partition.units(tiny(name)))
        assert len(names) >= 8, name
        if name.startswith("resnet"):
            inside = [n for n in names if re.match(r"conv\d_block\d+_\d", n)]
            assert inside == [], inside  # no cut inside a residual block
            assert "conv3_block1_out" in names and "stem_relu" in names
    assert partition.cut_names(partition.units(tiny("alexnet")))[:3] == ["conv1", "conv1_relu", "pool1"]


def test_balancer_finds_the_optimum_of_synthetic_costs():
    assert balance.best_partition([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == ([5, 2, 2], 17.0)
    assert balance.best_partition([10, 1, 1, 1, 1, 10], 2) == ([3, 3], 12.0)
    rng = np.random.RandomState(1)
    for _ in range(20):  # against brute force over every contiguous partition
        n, stages = rng.randint(4, 10), rng.randint(2, 4)
        costs = rng.rand(n) * rng.choice([1, 100], n)
        brute = min(max(sum(costs[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
                    for cuts in itertools.combinations(range(1, n), stages - 1))
        counts, best = balance.best_partition(list(costs), stages)
        assert best == pytest.approx(brute) and sum(counts) == n and min(counts) >= 1


def test_schedules_tick_counts_and_1f1b_holds_at_most_s_micro_batches():
    for stages, micro in [(2, 4), (4, 8), (3, 2)]:
        for name in ("gpipe", "1f1b"):  # interleaved_1f1b: tests/test_pipeline_interleaved.py
            orders = schedules.orders(name, stages, micro)
            assert len(schedules.ticks(orders)) == 2 * (micro + stages - 1)
            assert all(sorted(o) == sorted([(k, s, m) for k in "BF" for m in range(micro)])
                       for s, o in enumerate(orders))
        assert schedules.in_flight(schedules.orders("gpipe", stages, micro)) == [micro] * stages
        assert schedules.in_flight(schedules.orders("1f1b", stages, micro)) == \
            [min(stages - s, micro) for s in range(stages)]
    assert schedules.bubble(2, 4) == pytest.approx(1 / 5)


def test_stage_table_counts_every_parameter_and_the_cut_bytes():
    model = tiny("vgg11")
    _, counts, rows = pipeline.plan_stages(model, 3, balance="flops")
    assert sum(r["params"] for r in rows) == model.count_params()
    assert sum(r["layers"] for r in rows) == len(model.layers) - 1  # all but the input
    assert [r["cut_bytes_per_image"] is None for r in rows] == [False, False, True]
    cut = model.get_layer(rows[0]["last_layer"]).output
    assert rows[0]["cut_bytes_per_image"] == 4 * int(np.prod(cut.shape[1:]))
    # params put most of VGG's convolutions in stage 0 (the dense layers hold the weights); flops do not
    _, by_params, _ = pipeline.plan_stages(model, 2, balance="params")
    _, by_flops, _ = pipeline.plan_stages(model, 2, balance="flops")
    assert by_params != by_flops


# ----- bad input: one sentence each -------------------------------------------
def test_bad_input_is_one_clear_sentence():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed and has no layer graph to cut"):
        pipeline.split(Sub(), stages=2, devices=["/cpu:0"] * 2)
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"), keras.layers.Dense(2, name="b")])
    with pytest.raises(ValueError, match=r"can be cut at 1 places, so into at most 2 stages; got stages=3"):
        pipeline.split(seq, stages=3, devices=["/cpu:0"] * 3)
    with pytest.raises(ValueError, match=r"needs 128 devices \(stages x replicas\)"):
        pipeline.split(seq, stages=2, replicas=64)
    with pytest.raises(ValueError, match="'conv2_block1_1_conv' is not a cut point .*residual block"):
        pipeline.split(tiny("resnet18"), stages=2, balance=["conv2_block1_1_conv"], devices=["/cpu:0"] * 2)
    with pytest.raises(ValueError, match="'nope' is not a layer of the model"):
        pipeline.split(seq, stages=2, balance="nope", devices=["/cpu:0"] * 2)
    with pytest.raises(ValueError, match="Unknown pipeline schedule 'zb'"):
        pipeline.split(seq, stages=2, schedule="zb", devices=["/cpu:0"] * 2)
    piped = pipeline.split(seq, stages=2, micro_batches=4, balance="a", devices=["/cpu:0"] * 2, print_fn=None)
    piped.compile("sgd", "mse")
    with pytest.raises(ValueError, match="A batch of 6 does not split into 4 micro-batches"):
        piped.fit(np.zeros((12, 4)), np.zeros((12, 2)), batch_size=6, verbose=0)


# ----- Keras-native use on one device ----------------------------------------
def test_fit_evaluate_predict_callbacks_and_save_load_round_trip(tmp_path):
    x = np.random.RandomState(0).rand(32, 32, 32, 3).astype("float32")
    y = np.arange(32) % 10
    model = tiny("resnet18")
    piped = pipeline.split(model, stages=2, micro_batches=2, balance=["conv3_block2_out"],
                           devices=["/cpu:0"] * 2, print_fn=None)
    piped.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", metrics=["accuracy"])
    seen = []
    history = piped.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
                        callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))])
    assert seen == [0, 1, 0, 1] and int(piped.optimizer.iterations.numpy()) == 4
    assert history.history["loss"][1] < history.history["loss"][0]
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    predictions = piped.predict(x, batch_size=16, verbose=0)
    np.testing.assert_allclose(predictions, model.predict(x, batch_size=16, verbose=0), rtol=1e-5, atol=1e-6)
    assert piped.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"] == pytest.approx(
        history.history["val_loss"][-1], rel=1e-5)
    # the original model holds the trained weights; both save and load them
    path = str(tmp_path / "piped.weights.h5")
    piped.save_weights(path)
    model.save_weights(str(tmp_path / "model.weights.h5"))
    keras.utils.set_random_seed(5)
    fresh = models.build("resnet18", num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125)
    keras.utils.set_random_seed(6)
    other = models.build("resnet18", num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125)
    fresh_piped = pipeline.split(other, stages=2, balance=["conv3_block2_out"], devices=["/cpu:0"] * 2,
                                 print_fn=None)
    assert not np.array_equal(other.get_weights()[0], model.get_weights()[0])
    fresh_piped.load_weights(path)
    for a, b in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    fresh.load_weights(str(tmp_path / "model.weights.h5"))
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ----- several logical CPUs (subprocess) --------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "result.json")
    return worker_json("pipeline_worker.py", ["equivalence"], out, timeout=900, env=quiet_env())


def test_weights_match_the_unsplit_model_for_every_model_stage_count_schedule_and_precision(worker):
    cases = worker["cases"]
    assert len(cases) == 3 * 4 + 3 * 2
    for case in cases:
        label = f"{case['model']} {case['precision']} S={case['stages']} {case['schedule']}"
        assert case["same_start"] == 0.0 and case["updates"] == 3, label
        assert case["devices"] == [f"CPU:{i}" for i in range(case["stages"])], label  # each stage's variables
        assert case["moved"] > 1000, label  # training moved the weights far beyond the tolerance
        if case["precision"] == "float32":
            assert case["max_rel"] <= 1.0, label  # rtol 1e-5, atol 1e-6
        else:
            assert case["update_error"] < 0.5, label
            if case["model"] == "sequential":
                assert case["vs_accumulation"]["max_rel"] == 0.0, label


def test_mixed_float16_loss_scaling_trains_like_the_unsplit_model(worker):
    result = worker["float16"]
    assert result["optimizer"] == "LossScaleOptimizer" and np.isfinite(result["loss"]) and result["scale"] > 1
    assert result["moved"] > 1000 and result["update_error"] < 0.5


def test_batch_norm_matches_gradient_accumulation_over_the_same_micro_batches(worker):
    result = worker["batch_norm"]
    assert result["max_rel"] <= 1.0 and result["moved"] > 1000  # moving statistics included


def test_1f1b_holds_at_most_s_micro_batches_per_stage_and_gpipe_all(worker):
    assert worker["held"]["1f1b"] == [4, 3, 2, 1]
    assert worker["held"]["gpipe"] == [8, 8, 8, 8]


def test_hybrid_two_copies_of_two_stages_on_four_cpus_match_the_unsplit_model(worker):
    result = worker["hybrid"]
    assert [d[-5:] for d in result["devices"]] == ["CPU:0", "CPU:1", "CPU:2", "CPU:3"]
    assert result["max_rel"] <= 1.0 and result["moved"] > 1000


def test_time_balance_measures_each_stage(worker):
    rows = worker["time_table"]
    assert len(rows) == 2 and all(r["ms"] > 0 for r in rows)
    assert rows[0]["cut_bytes_per_image"] > 0 and rows[0]["last_layer"].endswith(("_out", "_add", "relu", "bn"))


def backward_devices(log, scope):
    """{stage: {CPU index}} of the gradient ops TF's placement log shows under ``gradient_tape/<scope><s>...``."""
    found = {}
    for stage, kind, device in re.findall(rf"^\S*gradient_tape/{scope}(\d)\S*: \((\w+)\): \S*device:CPU:(\d)$",
                                          log, re.M):
        found.setdefault(int(stage), set()).add(int(device))
    return found


def test_each_stage_backward_runs_on_its_own_device(tmp_path):
    """The placement log of a pipelined step: every gradient op of stage s on CPU:s.

    The same stages with one ``tape.gradient`` called under CPU:0 put stage
    1's backward on CPU:0 (tensorflow/tensorflow#33688): the check below sees that.
    """
    out = str(tmp_path / "placement.json")
    env = quiet_env()
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    code, stdout, stderr = run_reaped([sys.executable, os.path.join(HERE, "pipeline_worker.py"), "placement", out],
                                      timeout=600, env=env)
    assert code == 0, stderr[-3000:]
    log = stdout + stderr
    assert backward_devices(log, r"stage") == {0: {0}, 1: {1}}
    assert len(re.findall(r"gradient_tape/stage1_F\d\S*Conv2DBackpropFilter: ", log)) >= 2  # 2 micro-batches
    assert backward_devices(log, r"naive") == {0: {0}, 1: {0}}  # the upstream default, caught


# ----- tfpar-train --strategy=pipeline ------------------------------------------
PIPE = ["--strategy=pipeline", "--model=resnet18", "--width_multiplier=0.125", "--image_size=16",
        "--steps_per_epoch=4", "--validation_steps=2", "--verbose=0", "--batch_size=16", "--micro_batches=2"]


@pytest.mark.parametrize("args, message", [
    (["--batch_size=10", "--micro_batches=4"], "batch_size 10 does not split into 4 micro-batches x 1 pipeline"),
    (["--schedule=zb"], "Unknown pipeline schedule 'zb'; choose one of: gpipe, 1f1b, interleaved_1f1b."),
    (["--balance=,"], "balance must be one of time, flops, params, layers or a list of cut-layer names"),
    (["--grad_accum_steps=2"], "grad_accum_steps does not apply to --strategy=pipeline"),
    (["--stages=0"], "stages must be a positive integer"),
])
def test_pipeline_flag_mistakes_exit_2(capsys, args, message):
    from tfpar.run import cli

    code = cli.main(["tfpar-train", "--strategy=pipeline"] + args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err and err.count("tfpar-train: error:") == 1


@pytest.mark.slow
def test_tfpar_train_pipeline_on_digits_end_to_end_with_trace_and_resume(tmp_path):
    from helpers import tfpar_train_command

    run = lambda *extra: run_reaped(tfpar_train_command() + PIPE + list(extra), 600, env=quiet_env())  # noqa: E731
    code, out, err = run("--stages=40", f"--model_dir={tmp_path / 'bad'}")
    assert code == 2 and "Traceback" not in err and "so into at most 22 stages; got stages=40." in err
    code, out, err = run("--stages=2", "--epochs=2", "--profile_steps=2,3", "--keep_backups",
                         "--balance=conv3_block2_out", f"--model_dir={tmp_path / 'run'}")
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    pipe = summary["pipeline"]
    assert (pipe["stages"], pipe["micro_batches"], pipe["schedule"]) == (2, 2, "1f1b")
    assert [row["last_layer"] for row in pipe["stage_table"]][0] == "conv3_block2_out"
    assert pipe["bubble_theory"] == pytest.approx(1 / 3, abs=1e-3) and 0 < pipe["bubble_measured"] < 1
    assert {t[0] for t in pipe["timeline"]["tasks"]} == {0, 1} and len(pipe["timeline"]["tasks"]) == 8
    assert summary["optimizer_updates"] == 8 and 0 <= summary["val_accuracy"] <= 1
    assert "stage device" in out  # the printed stage table
    code, out, err = run("--stages=2", "--epochs=3", "--balance=conv3_block2_out", f"--model_dir={tmp_path / 'run'}")
    assert code == 0, err[-3000:]
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["resumed_from"]["epoch"] == 2 and resumed["optimizer_updates"] == 12
    assert resumed["epochs_done"] == 3  # the whole run, across the resume
