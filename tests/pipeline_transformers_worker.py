"""Subprocess side of tests/test_pipeline_transformers.py: keras-hub transformers and a nested ResNet pipelined.

``equivalence OUT``: on 4 logical CPUs, trains tiny keras-hub GPT-2 and Gemma
(dict inputs, a padding mask that zeros some positions) at S=2 and 4 with
GPipe and 1F1B, BERT (three inputs, two outputs) at S=2, and a tfpar ResNet-18
used as a layer inside another model at S=2, and compares each with the
unsplit model. ``cluster OUT [gemma|vit]`` (every task of a TF_CONFIG cluster
of 2 workers, run by tfpar-launch): a Gemma (or a tiny tfpar ViT) pipeline of
2 stages, one per task, then the unsplit model in worker 0's process alone,
and how far apart they end.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpar.runtime import strategies  # noqa: E402

if __name__ == "__main__" and sys.argv[1] == "equivalence":  # the tests import build() and data() from here
    strategies.configure_virtual_cpus(4)

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from tfpar import models  # noqa: E402
from tfpar.parallel import pipeline  # noqa: E402
from tfpar.step import steps  # noqa: E402

STEPS, BATCH, T, VOCAB = 3, 8, 8, 32


def _inputs(names):
    return {n: keras.Input((T,), dtype="int32", name=n) for n in names}


def build(name):
    """A tiny model around a keras-hub backbone (built from its config, nothing downloaded), or a nested ResNet."""
    keras.utils.set_random_seed(0)
    if name == "resnet_in_a_model":  # a Keras functional model used as a layer, with its own BatchNormalization
        inner = models.build("resnet18", num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.125,
                             dropout=0.0, include_top=False, pooling="avg")
        x = keras.Input((32, 32, 3), name="image")
        out = keras.layers.Dense(10, activation="softmax", name="head")(inner(keras.layers.Rescaling(0.5)(x)))
        return keras.Model(x, out, name=name)
    if name == "vit":  # tfpar's own ViT-Ti at 16 px, 4 px patches, 24 wide, 4 encoder blocks
        return models.build("vit_ti16", num_classes=10, input_shape=(16, 16, 3), patch_size=4,
                            width_multiplier=0.125, blocks=4)
    if name == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=T, dropout=0.0)
    elif name == "gemma":
        backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCAB, num_layers=2, num_query_heads=2,
                                                  num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
                                                  head_dim=4)
    else:
        backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=T, dropout=0.0)
        inputs = _inputs(["token_ids", "segment_ids", "padding_mask"])
        out = backbone(inputs)
        return keras.Model(inputs, {"tokens": keras.layers.Dense(VOCAB, name="tokens")(out["sequence_output"]),
                                    "label": keras.layers.Dense(2, name="label")(out["pooled_output"])}, name=name)
    inputs = _inputs(["token_ids", "padding_mask"])
    return keras.Model(inputs, keras.layers.Dense(VOCAB, name="lm_head")(backbone(inputs)), name=name)


def data(name):
    rng = np.random.RandomState(0)
    n = BATCH * STEPS
    if name in ("resnet_in_a_model", "vit"):
        size = 16 if name == "vit" else 32
        return rng.rand(n, size, size, 3).astype("float32"), np.arange(n) % 10
    x = {"token_ids": rng.randint(1, VOCAB, (n, T)).astype("int32"),
         "padding_mask": (np.arange(T)[None, :] < T - np.arange(n)[:, None] % 4).astype("int32")}  # 0-3 pads
    y = rng.randint(0, VOCAB, (n, T))
    if name == "bert":
        x["segment_ids"] = (np.arange(T)[None, :] >= T // 2).repeat(n, 0).astype("int32")
        y = {"tokens": y, "label": np.arange(n) % 2}
    return x, y


def compile_(model):
    # the ResNet's and the ViT's heads end in a softmax (a split model's name starts as the model's)
    logits = not model.name.startswith(("resnet", "vit"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, jit_compile=False)


def train(model, name):
    x, y = data(name)
    return model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False).history["loss"][-1]


def max_rel(a_weights, b_weights):
    """The largest |a - b| / (1e-5 |b| + 1e-6) over every weight: at most 1 when they agree to rtol 1e-5."""
    return float(max(np.max(np.abs(a - b) / (1e-5 * np.abs(b) + 1e-6)) for a, b in zip(a_weights, b_weights)))


def reference(name, accumulate=1):
    model = build(name)
    start = [w.copy() for w in model.get_weights()]
    compile_(model)
    steps.accumulate(model, accumulate)
    train(model, name)
    return model.get_weights(), start


GPT2_4 = ["embeddings_dropout", "transformer_layer_0", "transformer_layer_1"]  # hidden states and mask cross
GEMMA_4 = ["token_embedding", "decoder_block_0", "decoder_block_1"]
CASES = [("gpt2", 2, "gpipe", ["transformer_layer_0"]), ("gpt2", 2, "1f1b", ["transformer_layer_0"]),
         ("gpt2", 4, "gpipe", GPT2_4), ("gpt2", 4, "1f1b", GPT2_4),
         ("gemma", 2, "gpipe", ["decoder_block_0"]), ("gemma", 2, "1f1b", ["decoder_block_0"]),
         ("gemma", 4, "gpipe", GEMMA_4), ("gemma", 4, "1f1b", GEMMA_4),
         ("bert", 2, "gpipe", ["transformer_layer_0"]), ("resnet_in_a_model", 2, "1f1b", "flops")]


def equivalence(save):
    out, refs = {"cases": []}, {}
    for name, stages, schedule, balance in CASES:
        began = time.time()
        if name not in refs:  # BatchNormalization: against accumulation over the same micro-batches
            refs[name] = reference(name, accumulate=2 if name == "resnet_in_a_model" else 1)
        ref, start = refs[name]
        model = build(name)
        same_start = max_rel(model.get_weights(), start)
        micro = 2 if stages == 2 else 4  # fewer tasks to trace; 1F1B at S=4 still reaches its steady state
        piped = pipeline.split(model, stages=stages, micro_batches=micro, schedule=schedule, balance=balance,
                               print_fn=None)
        compile_(piped)
        loss = train(piped, name)
        out["cases"].append({
            "model": name, "stages": stages, "schedule": schedule, "loss": float(loss),
            "max_rel": max_rel(model.get_weights(), ref), "moved": max_rel(ref, start), "same_start": same_start,
            "devices": sorted({w.value.device[-5:] for w in model.weights}),
            "cut_tensors": [r["cut_tensors"] for r in piped.stage_table[:-1]],
            "cut_bytes": [r["cut_bytes_per_image"] for r in piped.stage_table[:-1]],
            "last_layers": [r["last_layer"] for r in piped.stage_table], "seconds": round(time.time() - began, 1)})
        save(out)
    return out


def cluster(save, name="gemma"):
    """``name`` in 2 stages on the 2 worker tasks (worker 0 drives), then unsplit in worker 0 alone, from the same
    start: the Gemma cut after its first decoder block, the ViT between encoder blocks by FLOPs."""
    from tfpar.parallel.pipeline import tasks
    from tfpar.runtime import cluster as cluster_lib
    from tfpar.runtime import peers, server

    info = cluster_lib.detect()
    if not info.is_chief:
        server.serve(info, until_gone=tasks.chief(info), line=tasks.announcement(info, 2))  # exits
    peers.connect(info, 60, "the pipeline's stage tasks")
    model = build(name)
    piped = pipeline.split(model, stages=2, micro_batches=2, schedule="1f1b",
                           balance=["decoder_block_0"] if name == "gemma" else "flops",
                           devices=tasks.devices(info, 2), print_fn=None)
    compile_(piped)
    loss = train(piped, name)
    result = {"loss": float(loss), "variable_devices": sorted({w.value.device for w in model.weights}),
              "cuts": [row["last_layer"] for row in piped.stage_table]}
    ref, start = reference(name)
    return {**result, "max_rel": max_rel(model.get_weights(), ref), "moved": max_rel(ref, start)}


if __name__ == "__main__":
    def save(result):
        with open(sys.argv[2] + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])

    save({"equivalence": equivalence, "cluster": cluster}[sys.argv[1]](save, *sys.argv[3:]))
