"""Layers and helpers shared by the model builders.

``FusedBatchNormalization`` is the reason this file exists: Keras 3's TF
backend normalises with ``tf.nn.moments`` + ``tf.nn.batch_normalization`` and
float32 casts, which made ResNet-50 train at 0.6-0.8x the speed of Keras 2 on
CPU (DESIGN.md item 10). The fused TF kernel restores that speed while keeping
Keras's semantics: the same variables, momentum, epsilon, inference mode and
the *biased* batch variance in the moving statistics.
"""

import keras
import tensorflow as tf

STEMS = ("auto", "imagenet", "cifar")
POOLINGS = (None, "avg", "max")
SMALL_IMAGE_MAX = 64  # inputs up to this many pixels a side get the small-image stem


@keras.saving.register_keras_serializable(package="tfpar")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TF's fused kernel.

    Used for 4-D channels-last inputs without a mask or renorm; anything else
    goes through the Keras implementation unchanged.
    """

    def _can_fuse(self, inputs, mask):
        return (
            mask is None
            and not getattr(self, "renorm", False)  # Keras 3.10 has no renorm option
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, self.compute_dtype)
        if x.dtype == tf.float64:  # the fused kernel has no float64; keep Keras's path
            return super().call(inputs, training=training, mask=mask)
        channels = x.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta if self.center else tf.zeros([channels], tf.float32)
        gamma = tf.cast(gamma, tf.float32)
        beta = tf.cast(beta, tf.float32)
        if training and self.trainable:
            y, mean, unbiased_var = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
            # The kernel returns Bessel-corrected variance; Keras keeps the biased one.
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
            var = unbiased_var * tf.math.maximum(count - 1.0, 0.0) / count
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=False,
            )
        return tf.cast(y, self.compute_dtype)


def check_choice(what, value, allowed):
    """Raise one clear ValueError when ``value`` is not among ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}.")


def check_input_shape(input_shape, minimum):
    """Validate an (H, W, C) shape; the error says what is accepted."""
    shape = tuple(input_shape)
    if len(shape) != 3 or any((not isinstance(d, int)) or d <= 0 for d in shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}.")
    if min(shape[:2]) < minimum:
        raise ValueError(f"input_shape {shape} is too small: height and width must be at least {minimum}.")
    return shape


def resolve_stem(stem, input_shape):
    """``auto`` picks the small-image stem for inputs of at most 64 pixels a side."""
    check_choice("stem", stem, STEMS)
    if stem == "auto":
        return "cifar" if max(input_shape[:2]) <= SMALL_IMAGE_MAX else "imagenet"
    return stem


def check_common(num_classes, include_top, pooling, width_multiplier, dropout, weight_decay):
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    check_choice("pooling", pooling, POOLINGS)
    if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
        raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}.")
    if not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")


def scaled(channels, width_multiplier):
    """Channel count scaled by ``width_multiplier``, never below 1."""
    return max(1, int(round(channels * width_multiplier)))


def l2(weight_decay):
    return keras.regularizers.L2(weight_decay) if weight_decay else None


def batch_norm(name, momentum, epsilon):
    return FusedBatchNormalization(momentum=momentum, epsilon=epsilon, name=name)


def classifier(x, num_classes, weight_decay, activation, name="predictions"):
    """Final dense layer; the activation runs in float32 under mixed precision."""
    x = keras.layers.Dense(num_classes, kernel_regularizer=l2(weight_decay), name=name)(x)
    if activation is not None:
        x = keras.layers.Activation(activation, dtype="float32", name=f"{name}_{activation}")(x)
    else:
        x = keras.layers.Activation("linear", dtype="float32", name=f"{name}_float32")(x)
    return x


def global_pool(x, pooling):
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x
