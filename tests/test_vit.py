"""tfpar's ViT builders: exact counts, precision, cuts between blocks, default layouts, flags; then training.

The fast tier builds full-size models inside ``keras.StatelessScope`` (shapes,
no memory). The slow tier starts every run at once in one fixture and each
test asserts its part: the pipeline equivalence at S=2 and 4 on 4 logical
CPUs (tests/vit_worker.py) and ``tfpar-train --model=vit_s16 --image_size=32
--patch_size=4 --data=digits`` under mirrored, pipeline, dtensor and
multi-worker (2 real processes). They run three at a time, so they keep
every core busy and the slow tier costs their CPU time over the cores, not
the sum of their start-ups and traces one after another.
"""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import quiet_env, reap, tfpar_train_command

from tfpar import models
from tfpar.models import vit
from tfpar.parallel import pipeline
from tfpar.parallel.pipeline import partition
from tfpar.parallel.sharding import report, rules
from tfpar.run import cli, recipe
from tfpar.run.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("tfpar-train: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def tiny(name="vit_s16", **kw):
    keras.utils.set_random_seed(0)
    return models.build(name, num_classes=10, input_shape=(32, 32, 3), patch_size=4, width_multiplier=0.125, **kw)


# ----- the builders ----------------------------------------------------------
@pytest.mark.parametrize("name,expected", [("vit_ti16", 5_717_416), ("vit_s16", 22_050_664),
                                           ("vit_b16", 86_567_656),
                                           pytest.param("vit_l16", 304_326_632, marks=pytest.mark.slow)])
def test_parameter_counts_at_224_px_match_the_paper_and_timm(name, expected):
    with keras.StatelessScope():  # shapes only: ViT-L's 1.2 GB is never allocated
        model = models.build(name)
    assert trainable_count(model) == expected
    assert len(model.non_trainable_weights) == 0
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)


def test_structure_shapes_and_pooling():
    model = tiny("vit_s16")  # 8x8 patches of 4 px, 6 heads of 8: 48 wide, MLP 192
    assert model.get_layer("patch_embedding").kernel.shape == (4, 4, 3, 48)
    assert model.get_layer("embeddings").positions.shape == (1, 65, 48)  # class token + 64 patches
    block = model.get_layer("encoder_block12")
    assert block.attention.get_config()["num_heads"] == 6 and block.mlp1.kernel.shape == (48, 192)
    assert block.ln1.epsilon == 1e-6 and model.get_layer("encoder_norm").epsilon == 1e-6
    assert [layer.name for layer in model.layers].count("encoder_block13") == 0
    out = model(np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")).numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    # The class token is what the head reads: changing it changes the output, and "avg" ignores it.
    sequence = keras.Model(model.input, model.get_layer("encoder_norm").output)(np.ones((1, 32, 32, 3)))
    pooled = vit.TokenPooling("avg")(sequence).numpy()
    np.testing.assert_allclose(pooled, sequence.numpy()[:, 1:].mean(axis=1), rtol=1e-6)
    headless = models.build("vit_ti16", input_shape=(32, 32, 3), patch_size=8, include_top=False, pooling=None,
                            width_multiplier=0.125)
    assert headless.output_shape == (None, 17, 24)


@pytest.mark.parametrize("policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision_keeps_float32_weights_and_outputs(policy, compute):
    keras.mixed_precision.set_global_policy(policy)
    model = tiny("vit_ti16", blocks=2)
    block = model.get_layer("encoder_block1")
    assert block.mlp1.compute_dtype == compute and block.attention.compute_dtype == compute
    assert block.mlp1.kernel.dtype == "float32" and model.get_layer("embeddings").class_token.dtype == "float32"
    out = model(np.random.rand(2, 32, 32, 3).astype("float32"), training=True)
    assert out.dtype == tf.float32


def test_pipeline_cuts_fall_between_encoder_blocks_and_flops_are_counted():
    model = tiny("vit_s16")
    names = partition.cut_names(partition.units(model))
    assert names[:4] == ["patch_embedding", "patch_tokens", "embeddings", "encoder_block1"]
    assert [n for n in names if n.startswith("encoder_block")] == [f"encoder_block{b}" for b in range(1, 13)]
    # 65 tokens, 48 wide, MLP 192: q, k, v, output projections + two attention products + the MLP.
    assert model.get_layer("encoder_block1").flops_per_example() == (
        2 * 65 * 48 * 48 * 4 + 4 * 65 * 65 * 48 + 4 * 65 * 48 * 192)
    _, counts, rows = pipeline.plan_stages(model, 4, balance="flops")
    assert [r["last_layer"] for r in rows[:3]] == ["encoder_block3", "encoder_block6", "encoder_block9"]
    assert rows[0]["cut_bytes_per_image"] == 65 * 48 * 4


def test_default_rules_split_attention_by_heads_and_the_mlp_megatron_style():
    mesh = {"batch": 1, "model": 2}
    rows = report.plan(lambda: models.build("vit_s16", num_classes=10), rules.default_rules("vit_s16"), mesh)
    shape = {r["path"]: r["device_shape"] for r in rows}
    block = "encoder_block7/"
    for part in ("query", "key", "value"):
        assert shape[f"{block}attention/{part}/kernel"] == (384, 3, 64)  # 6 heads -> 3 per device
        assert shape[f"{block}attention/{part}/bias"] == (3, 64)
    assert shape[f"{block}attention/attention_output/kernel"] == (3, 64, 384)  # rows: its heads
    assert shape[f"{block}attention/attention_output/bias"] == (384,)
    assert shape[f"{block}mlp1/kernel"] == (384, 768) and shape[f"{block}mlp1/bias"] == (768,)  # columns
    assert shape[f"{block}mlp2/kernel"] == (768, 384) and shape[f"{block}mlp2/bias"] == (384,)  # rows
    assert shape["predictions/kernel"] == (384, 5)
    assert shape["embeddings/position_embedding"] == (1, 197, 384)  # replicated
    totals = report.totals(rows)
    assert totals["param_bytes"] == 4 * (22_050_664 - 1000 * 384 - 1000 + 10 * 384 + 10)
    assert totals["param_bytes_per_device"] < 0.53 * totals["param_bytes"]
    # ViT-Ti's 3 heads do not split over 2: replicated, and the plan says why (default rules are lenient).
    rows = report.plan(lambda: models.build("vit_ti16"), rules.default_rules("vit_ti16"), mesh)
    query = next(r for r in rows if r["path"] == "encoder_block1/attention/query/kernel")
    assert query["device_shape"] == (192, 3, 64) and "does not divide evenly" in query["note"]


def test_keras_file_round_trip(tmp_path):
    model = tiny("vit_ti16", blocks=1, dropout=0.1)
    model.save(tmp_path / "vit.keras")
    loaded = keras.models.load_model(tmp_path / "vit.keras")  # the blocks are registered serializables
    x = np.random.RandomState(1).rand(2, 32, 32, 3).astype("float32")
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    assert loaded.get_layer("encoder_block1").get_config()["dropout"] == 0.1


def test_bad_options_are_one_sentence():
    with pytest.raises(ValueError, match=r"input_shape \(30, 30, 3\) does not divide into 4x4 patches"):
        models.build("vit_s16", input_shape=(30, 30, 3), patch_size=4)
    with pytest.raises(ValueError, match="pooling must be 'token' or 'avg' when include_top"):
        models.build("vit_s16", pooling=None)
    with pytest.raises(ValueError, match="pooling must be one of"):
        models.build("vit_s16", pooling="max")
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        models.build("vit_s16", patch_size=0)
    assert {"patch_size", "pooling", "num_classes", "dropout"} <= set(models.options("vit_b16"))


@pytest.mark.parametrize("args,message", [
    (["--model=resnet18", "--patch_size=4"], "patch_size applies only to ViT models"),
    (["--model=vit_s16", "--image_size=30", "--patch_size=4"], "image_size 30 is not a multiple of patch_size 4"),
    (["--model=vit_s16", "--image_size=40"], "image_size 40 is not a multiple of patch_size 16"),
])
def test_patch_flag_mistakes_exit_2(capsys, args, message):
    assert cli.main(["tfpar-train", *args]) == 2
    line = error_line(capsys.readouterr().err)
    assert message in line and line.endswith(".")


def test_recipe_passes_patch_size_and_leaves_out_what_vit_lacks():
    config = TrainConfig(model="vit_ti16", image_size=16, patch_size=4, width_multiplier=0.125).validate()
    model = recipe.build_model(config)  # bn_momentum is a config field ViT has no use for
    assert model.get_layer("patch_embedding").kernel.shape == (4, 4, 3, 24)
    assert model.input_shape == (None, 16, 16, 3) and model.output_shape == (None, 10)


# ----- training: every run at once, each test reads its part -------------------
SMALL = ["--model=vit_s16", "--image_size=32", "--patch_size=4", "--data=digits", "--width_multiplier=0.125",
         "--epochs=1", "--steps_per_epoch=2", "--validation_steps=0", "--notensorboard", "--verbose=0"]
RUNS = {
    "mirrored": ["--strategy=mirrored", "--virtual_cpus=2", "--batch_size=16"],
    "pipeline": ["--strategy=pipeline", "--virtual_cpus=2", "--stages=2", "--micro_batches=2", "--balance=flops",
                 "--batch_size=16"],
    "dtensor": ["--strategy=dtensor", "--virtual_cpus=2", "--mesh=batch=1,model=2", "--batch_size=16"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    commands = {name: tfpar_train_command() + SMALL + args + [f"--model_dir={root / name}"]
                for name, args in RUNS.items()}
    commands["multi_worker"] = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "560", "--",
                                *tfpar_train_command(), "--strategy=multi_worker", *SMALL, "--batch_size=16",
                                f"--model_dir={root / 'multi_worker'}"]
    commands["equivalence"] = [sys.executable, os.path.join(HERE, "vit_worker.py")]
    results, deadline = {}, time.monotonic() + 560
    # Two waves of three processes: the two workers start only after the one-process runs have ended, so a
    # loaded CPU does not starve their coordination-service heartbeats (10 s) into a "lost peer" exit.
    for wave in (("mirrored", "pipeline", "dtensor"), ("multi_worker", "equivalence")):
        procs, logs = {}, {}
        try:
            for name in wave:  # output to files: a full pipe would stall a run
                logs[name] = open(root / f"{name}.log", "w+")
                procs[name] = subprocess.Popen(commands[name], stdout=logs[name], stderr=subprocess.STDOUT,
                                               text=True, env=quiet_env(), start_new_session=True, cwd=HERE)
            for name, proc in procs.items():
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                logs[name].seek(0)
                results[name] = {"code": proc.returncode, "out": logs[name].read(), "dir": root / name}
        finally:
            for name, proc in procs.items():
                reap(proc)
                logs[name].close()
    return results


def summary(result, name="summary.json"):
    assert result["code"] == 0, result["out"][-3000:]
    return json.loads((result["dir"] / name).read_text())


@pytest.mark.slow
def test_pipeline_matches_the_unsplit_vit_at_2_and_4_stages(runs):
    result = runs["equivalence"]
    assert result["code"] == 0, result["out"][-3000:]
    line = next(line for line in result["out"].splitlines() if line.startswith("RESULT "))
    cases = json.loads(line[len("RESULT "):])["cases"]
    assert [c["stages"] for c in cases] == [2, 4]
    for case in cases:
        assert case["same_start"] == 0.0 and case["updates"] == 3 and case["moved"] > 1000, case
        assert case["max_rel"] <= 1.0, case  # every weight within rtol 1e-5 + atol 1e-6 after 3 SGD steps
        assert case["devices"] == [f"CPU:{i}" for i in range(case["stages"])], case
        assert all(c.startswith("encoder_block") for c in case["cuts"][:-1]), case  # cuts between blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_tfpar_train_vit_s16_under_one_process_strategies(runs, name):
    s = summary(runs[name])
    assert s["config"]["model"] == "vit_s16" and s["config"]["patch_size"] == 4
    assert s["optimizer_updates"] == 2 and np.isfinite(s["train_loss"])
    if name == "mirrored":
        assert s["replicas"] == 2
    if name == "pipeline":
        assert "encoder_block" in runs[name]["out"]  # the stage table: stages end at an encoder block
    if name == "dtensor":
        assert s["mesh"] == {"batch": 1, "model": 2} and s["param_bytes_per_device"] < 0.6 * s["param_bytes"]


@pytest.mark.slow
def test_tfpar_train_vit_s16_on_two_worker_processes(runs):
    workers = [summary(runs["multi_worker"], f"summary.worker-{i}.json") for i in range(2)]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]  # one model, trained together
    assert all(w["num_workers"] == 2 and w["optimizer_updates"] == 2 for w in workers)
    assert np.isfinite(workers[0]["train_loss"])
