"""The builders: exact parameter counts, shapes, precision and the registry's errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfpar import models
from tfpar.models.layers import FusedBatchNormalization


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# Counts from the papers / reference implementations at 1000 classes.
@pytest.mark.parametrize(
    "name,expected",
    [
        ("alexnet", 62_378_344),
        ("vgg11", 132_863_336),
        ("vgg13", 133_047_848),
        ("vgg16", 138_357_544),
        ("vgg19", 143_667_240),
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_parameter_counts_match_the_papers(name, expected):
    model = models.build(name)
    assert trainable_count(model) == expected
    if not name.startswith("resnet"):
        assert model.count_params() == expected  # no BN, so nothing non-trainable


@pytest.mark.parametrize("name,size", [("alexnet", 227), ("vgg11", 224), ("resnet18", 224), ("resnet50", 224)])
def test_forward_shape_at_default_size(name, size):
    model = models.build(name, num_classes=7, width_multiplier=0.125)
    assert model.input_shape == (None, size, size, 3)
    out = model(np.zeros((1, size, size, 3), "float32"), training=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("name", models.names())
def test_every_model_runs_at_32px_with_the_small_stem(name):
    model = models.build(name, input_shape=(32, 32, 3), num_classes=10, width_multiplier=0.125)
    out = model(np.random.rand(2, 32, 32, 3).astype("float32"), training=False).numpy()
    assert out.shape == (2, 10)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)  # softmax rows


def test_small_stem_is_chosen_automatically_and_differs_from_imagenet():
    small = models.build("resnet18", input_shape=(32, 32, 3), num_classes=10)
    assert small.get_layer("stem_conv").kernel.shape == (3, 3, 3, 64)
    assert "stem_pool" not in [layer.name for layer in small.layers]
    big = models.build("resnet18", input_shape=(96, 96, 3), num_classes=10)
    assert big.get_layer("stem_conv").kernel.shape == (7, 7, 3, 64)


@pytest.mark.parametrize("policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
@pytest.mark.parametrize("name", ["alexnet_bn", "vgg11_bn", "resnet18"])
def test_mixed_precision_keeps_float32_outputs(policy, compute, name):
    keras.mixed_precision.set_global_policy(policy)
    model = models.build(name, input_shape=(32, 32, 3), num_classes=10, width_multiplier=0.125)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == compute
    assert conv.kernel.dtype == "float32"  # variables stay float32
    out = model(np.random.rand(2, 32, 32, 3).astype("float32"), training=True)
    assert out.dtype == tf.float32


def test_options_reach_the_layers():
    model = models.build("vgg11_bn", input_shape=(32, 32, 3), num_classes=5, weight_decay=1e-4,
                         width_multiplier=0.5, bn_momentum=0.8, include_top=True)
    assert model.get_layer("block1_conv1").kernel.shape[-1] == 32
    assert model.get_layer("block1_conv1_bn").momentum == 0.8
    assert len(model.losses) > 0  # L2 penalties
    headless = models.build("resnet18", input_shape=(32, 32, 3), include_top=False, pooling="avg", width_multiplier=0.25)
    assert headless.output_shape == (None, 128)


def test_registry_errors_name_the_accepted_values():
    with pytest.raises(ValueError, match="Unknown model 'resnet99'.*resnet50"):
        models.build("resnet99")
    with pytest.raises(ValueError, match="does not take option.*colour.*accepts: .*num_classes"):
        models.build("vgg16", colour="red")
    with pytest.raises(ValueError, match="pooling must be one of"):
        models.build("resnet18", include_top=False, pooling="median")
    with pytest.raises(ValueError, match="input_shape .* too small"):
        models.build("alexnet", input_shape=(32, 32, 3), stem="imagenet")
    with pytest.raises(ValueError, match="stem must be one of"):
        models.build("resnet18", stem="huge")
    assert "batch_norm" not in models.options("vgg16_bn")
    assert {"alexnet", "vgg16", "vgg16_bn", "resnet50"} <= set(models.names())


def _bn_pair(momentum=0.9):
    fused = FusedBatchNormalization(momentum=momentum)
    plain = keras.layers.BatchNormalization(momentum=momentum)
    for layer in (fused, plain):
        layer.build((8, 5, 5, 3))
        layer.gamma.assign([1.0, 2.0, 0.5])
        layer.beta.assign([0.1, -0.2, 0.3])
    return fused, plain


def test_fused_batch_norm_matches_keras_in_training_and_inference():
    x = np.random.RandomState(0).normal(1.0, 3.0, (8, 5, 5, 3)).astype("float32")
    fused, plain = _bn_pair()
    for _ in range(3):  # several updates of the moving statistics
        np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), atol=1e-5)
    # Keras keeps the biased batch variance in its moving average; so must we.
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), atol=1e-5)
    fused.trainable = False  # frozen BN runs in inference mode and leaves its statistics alone
    before = fused.moving_mean.numpy().copy()
    fused(x, training=True)
    np.testing.assert_array_equal(before, fused.moving_mean.numpy())


def test_fused_batch_norm_under_bfloat16_is_close_to_float32():
    x = np.random.RandomState(1).normal(0.0, 1.0, (8, 5, 5, 3)).astype("float32")
    ref, _ = _bn_pair()
    expected = ref(x, training=True).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    fused, _ = _bn_pair()
    out = fused(x, training=True)
    assert out.dtype == tf.bfloat16 and fused.moving_mean.dtype == "float32"
    np.testing.assert_allclose(out.numpy().astype("float32"), expected, atol=0.05)
