"""Run by tests/test_vit.py in a subprocess with 4 logical CPUs; prints ``RESULT {json}``.

Not a test module: logical devices must be set before TensorFlow starts.
A tiny ViT-Ti (16 px, 4 px patches, 24 wide, 4 blocks) trains 3 SGD steps unsplit, then
as a pipeline of 2 and of 4 stages (one per logical CPU) from the same
initial weights; the weights are compared at rtol 1e-5 in float32.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpar.runtime import strategies  # noqa: E402

strategies.configure_virtual_cpus(4)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfpar import models  # noqa: E402
from tfpar.parallel import pipeline  # noqa: E402

STEPS, BATCH = 3, 8


def build():
    keras.utils.set_random_seed(0)
    return models.build("vit_ti16", num_classes=10, input_shape=(16, 16, 3), patch_size=4, width_multiplier=0.125,
                        blocks=4)


def train(model):
    rng = np.random.RandomState(0)
    x = rng.rand(BATCH * STEPS, 16, 16, 3).astype("float32")
    y = (np.arange(BATCH * STEPS) % 10).astype("int32")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", jit_compile=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)


def max_rel(a_weights, b_weights):
    """The largest |a - b| / (1e-5 |b| + 1e-6): at most 1 when every weight agrees to rtol 1e-5."""
    return float(max(np.max(np.abs(a - b) / (1e-5 * np.abs(b) + 1e-6)) for a, b in zip(a_weights, b_weights)))


def main():
    reference = build()
    start = [w.copy() for w in reference.get_weights()]
    train(reference)
    ref = reference.get_weights()
    out = {"cases": []}
    for stages in (2, 4):
        model = build()
        piped = pipeline.split(model, stages=stages, micro_batches=2, schedule="1f1b", balance="flops", print_fn=None)
        train(piped)
        out["cases"].append({
            "stages": stages, "max_rel": max_rel(model.get_weights(), ref),
            "same_start": max_rel(build().get_weights(), start), "moved": max_rel(ref, start),
            "updates": int(piped.optimizer.iterations.numpy()),
            "cuts": [row["last_layer"] for row in piped.stage_table],
            "devices": sorted({w.value.device[-5:] for w in model.weights})})
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
