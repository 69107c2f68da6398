"""Pipelines of transformer graphs: several inputs and outputs, nested backbones cut inside, cuts carrying tuples.

keras-hub GPT-2, Gemma and BERT backbones are built from tiny configs (nothing
downloaded). The fast tests check where the graphs are cut and what crosses
each cut, the errors, and that the pipelined model predicts as the original.
Training on several logical CPUs, and on two worker processes, runs in
subprocesses (tests/pipeline_transformers_worker.py); the equivalence cases
compare the weights after 3 SGD-momentum steps with the unsplit model at
rtol 1e-5 + atol 1e-6 in float32 (the nested ResNet, which has
BatchNormalization, with tfpar's accumulation over the same micro-batches).
"""

import json
import os
import sys

import keras
import numpy as np
import pytest

from helpers import quiet_env, run_reaped

pytest.importorskip("keras_hub")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "pipeline_transformers_worker.py")
import pipeline_transformers_worker as hub  # noqa: E402  (tiny models and their data)

from tfpar.parallel import pipeline  # noqa: E402
from tfpar.parallel.pipeline import partition  # noqa: E402

CPU2 = ["/cpu:0"] * 2


def test_keras_hub_models_are_cut_between_blocks_and_each_cut_forwards_the_mask():
    gpt2 = hub.build("gpt2")
    names = partition.cut_names(partition.units(gpt2))
    assert names == ["token_embedding", "embeddings_add", "embeddings_dropout", "transformer_layer_0",
                     "transformer_layer_1", "layer_norm"]  # never inside a block, nor between the two embeddings
    _, counts, rows = pipeline.plan_stages(gpt2, 2, balance=["transformer_layer_0"])
    # hidden states (T x 8 float32) and the int32 padding mask (T) cross; the next stage reads both
    assert rows[0]["cut_tensors"] == 2 and rows[0]["cut_bytes_per_image"] == hub.T * 8 * 4 + hub.T * 4
    assert sum(r["params"] for r in rows) == gpt2.count_params()
    # the backbone's name stands for its last layer
    assert pipeline.plan_stages(gpt2, 2, balance=["gpt2_backbone"])[1] == \
        pipeline.plan_stages(gpt2, 2, balance=["layer_norm"])[1]
    gemma_names = partition.cut_names(partition.units(hub.build("gemma")))
    assert {"decoder_block_0", "decoder_block_1"} <= set(gemma_names)
    bert = partition.units(hub.build("bert"))
    assert len(bert[0].output) == 3  # token embedding, segment ids, padding mask
    assert len(bert[-1].output) == 2  # two outputs, as a dict


def test_a_functional_model_used_as_a_layer_is_cut_between_its_residual_blocks():
    names = partition.cut_names(partition.units(hub.build("resnet_in_a_model")))
    assert "conv3_block1_out" in names and "conv2_block1_1_conv" not in names
    assert all(len(u.output) == 1 for u in partition.units(hub.build("resnet_in_a_model")))


def test_a_pipelined_bert_with_three_inputs_and_two_outputs_predicts_as_the_original():
    model = hub.build("bert")
    x, _ = hub.data("bert")
    x = {k: v[:8] for k, v in x.items()}
    piped = pipeline.split(model, stages=2, balance=["transformer_layer_0"], devices=CPU2, print_fn=None)
    got, want = piped.predict(x, batch_size=8, verbose=0), model.predict(x, batch_size=8, verbose=0)
    assert sorted(got) == ["label", "tokens"]
    for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_transformer_mistakes_are_one_sentence():
    gpt2 = hub.build("gpt2")
    with pytest.raises(ValueError, match=r"Cut layer 'self_attention' is inside layer 'transformer_layer_0', which "
                                         r"runs as one piece .*; cut after one of: token_embedding, embeddings_add"):
        pipeline.split(gpt2, stages=2, balance=["self_attention"], devices=CPU2)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(4, name="a")(x)
    centred = keras.layers.Lambda(lambda t: t - keras.ops.mean(t, axis=0, keepdims=True), name="centre")(h)
    mixing = keras.Model(x, keras.layers.Dense(2, name="b")(centred), name="mixing")
    with pytest.raises(ValueError, match=r"Output 'b' of model 'mixing' for one example changes with the other "
                                         r"examples in its batch.*BatchNormalization is allowed"):
        pipeline.split(mixing, stages=2, balance="layers", devices=CPU2)
    inner = keras.Model(x, keras.layers.Dense(4, name="d")(x), name="inner")
    with pytest.raises(ValueError, match=r"Layer 'inner' is called more than once in 'twice' \(shared or tied"):
        partition.units(keras.Model(x, inner(inner(x)), name="twice"))
    bn = keras.layers.BatchNormalization(name="bn")(h)
    normed = keras.Model(x, keras.layers.Dense(2, name="c")(bn), name="normed")
    assert pipeline.split(normed, stages=2, balance="layers", devices=CPU2, print_fn=None).plan.stages


# ----- several logical CPUs and processes (subprocesses) ------------------------------
@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hub") / "result.json")
    code, stdout, stderr = run_reaped([sys.executable, WORKER, "equivalence", out], timeout=900, env=quiet_env())
    assert code == 0, stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_keras_hub_transformers_and_a_nested_resnet_train_like_the_unsplit_model(equivalence):
    cases = equivalence["cases"]
    assert [(c["model"], c["stages"], c["schedule"]) for c in cases] == [c[:3] for c in hub.CASES]
    for case in cases:
        label = f"{case['model']} S={case['stages']} {case['schedule']}"
        assert case["same_start"] == 0.0 and case["moved"] > 1000, label
        assert case["max_rel"] <= 1.0, label  # rtol 1e-5, atol 1e-6
        assert case["devices"] == [f"CPU:{i}" for i in range(case["stages"])], label
        if case["model"] != "resnet_in_a_model":  # cuts between blocks carry the hidden states and the mask
            assert case["cut_tensors"][:2] == [2] * min(2, case["stages"] - 1), label


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "vit"])
def test_a_transformer_on_two_worker_tasks_trains_as_the_unsplit_model_in_one_process(tmp_path, name):
    """A keras-hub Gemma and tfpar's own ViT, one stage per worker task through tfpar-launch."""
    out = str(tmp_path / "cluster.json")
    command = [sys.executable, "-m", "tfpar.launcher", "--workers", "2", "--timeout", "500", "--",
               sys.executable, WORKER, "cluster", out, name]
    code, log, _ = run_reaped(command, 560, env=quiet_env(), merge_output=True)
    assert code == 0, log[-4000:]
    assert "worker-1 serves stage 1 of copy 0" in log
    with open(out) as f:
        got = json.load(f)
    assert got["variable_devices"] == [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(2)]
    assert got["max_rel"] <= 1.0 and got["moved"] > 1000 and np.isfinite(got["loss"])
    if name == "vit":  # cut between encoder blocks
        assert got["cuts"][0].startswith("encoder_block"), got["cuts"]
