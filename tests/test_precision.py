"""Precision policies: auto rules, loss scaling, and mixed fits under mirrored (subprocess).

Mixed fits under multi_worker live in test_multi_worker.py (real processes).
"""

import json
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from tfpar.runtime import precision

HERE = os.path.dirname(os.path.abspath(__file__))


def test_explicit_policies_are_set_globally():
    for name in ("float32", "mixed_float16", "mixed_bfloat16"):
        assert precision.apply(name) == name
        assert keras.mixed_precision.global_policy().name == name


def test_unknown_policy_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="Unknown precision 'fp16'; choose one of: auto, float32, mixed_float16"):
        precision.apply("fp16")


@pytest.mark.parametrize("capability,expected", [((8, 0), "mixed_float16"), ((7, 0), "mixed_float16"),
                                                 ((6, 1), "float32")])
def test_auto_on_nvidia_gpus_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(precision, "_gpu_compute_capability", lambda: capability)
    assert precision.resolve("auto") == expected


@pytest.mark.parametrize("native,onednn,expected", [(True, "1", "mixed_bfloat16"), (True, "0", "float32"),
                                                    (False, "1", "float32")])
def test_auto_on_cpus_uses_bf16_only_where_it_is_faster(monkeypatch, native, onednn, expected):
    monkeypatch.setattr(precision, "_gpu_compute_capability", lambda: None)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    assert precision.resolve("auto") == expected


def test_auto_on_tpu_is_bfloat16(monkeypatch):
    class FakeTPUStrategy(tf.distribute.TPUStrategy):
        def __init__(self):  # a TPU cannot be reached here; only the type matters to resolve()
            pass

    monkeypatch.setattr(precision, "_gpu_compute_capability", lambda: (8, 0))
    assert precision.resolve("auto", FakeTPUStrategy()) == "mixed_bfloat16"


@pytest.mark.parametrize("policy,wrapped", [("float32", False), ("mixed_bfloat16", False), ("mixed_float16", True)])
def test_compile_wraps_the_optimizer_exactly_under_mixed_float16(policy, wrapped):
    precision.apply(policy)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) is wrapped


def test_loss_scale_optimizer_dynamic_and_fixed():
    sgd = keras.optimizers.SGD(0.1)
    dynamic = precision.loss_scale_optimizer(sgd)
    assert dynamic.dynamic_growth_steps == 2000 and float(dynamic.initial_scale) == 2.0**15
    assert precision.loss_scale_optimizer(dynamic) is dynamic  # not wrapped twice
    fixed = precision.loss_scale_optimizer(keras.optimizers.SGD(0.1), initial_scale=128.0, dynamic=False)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    precision.apply("mixed_float16")
    model.compile(fixed, "mse")
    assert model.optimizer is fixed  # compile keeps the user's loss scale
    model.fit(tf.ones((64, 4)), tf.ones((64, 1)), batch_size=8, epochs=1, verbose=0)
    assert fixed.dynamic_growth_steps == 2**62  # never grows
    assert float(fixed.scale_loss(1.0)) == 128.0  # and 8 finite steps left it where it was


@pytest.mark.slow
def test_mixed_precision_fits_under_mirrored(tmp_path):
    out = tmp_path / "precision.json"
    subprocess.run([sys.executable, os.path.join(HERE, "mirrored_fit.py"), "precision", str(out)],
                   check=True, timeout=300)
    result = json.loads(out.read_text())
    for policy, compute, optimizer in [("mixed_float16", "float16", "LossScaleOptimizer"),
                                       ("mixed_bfloat16", "bfloat16", "SGD")]:
        run = result[policy]
        assert run["replicas"] == 2 and run["compute_dtype"] == compute and run["optimizer"] == optimizer
        assert run["loss"][-1] < 0.8 * run["loss"][0]
