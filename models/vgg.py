"""VGG (Simonyan & Zisserman, 2014): configurations A, B, D and E.

At 224x224 and 1000 classes, without BN: vgg11 132,863,336, vgg13
133,047,848, vgg16 138,357,544 and vgg19 143,667,240 parameters. The
small-image stem keeps the convolutions (32 px halves to 1 px over the five
pools) and uses 512-wide hidden dense layers, as VGG on CIFAR usually does.
"""

import functools

import keras

from tfpar.models import layers as L

# Convolution widths per block; each block ends with a 2x2 max-pool.
CONFIGS = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def vgg(
    depth,
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling=None,
    batch_norm=False,
    dropout=0.5,
    weight_decay=0.0,
    width_multiplier=1.0,
    stem="auto",
    bn_momentum=0.9,
    bn_epsilon=1e-3,
    classifier_activation="softmax",
    name=None,
):
    """Build VGG-``depth`` (11, 13, 16 or 19).

    Args:
      depth: 11, 13, 16 or 19 weight layers (configurations A, B, D, E).
      num_classes: classes of the final layer (when ``include_top``).
      input_shape: (height, width, channels); default (224, 224, 3), or
        (32, 32, 3) when ``stem="cifar"``. Height and width must be at least 32.
      include_top: add the dense classifier (4096-4096, or 512-512 for the
        small-image stem).
      pooling: ``None``, ``"avg"`` or ``"max"``, used only without the top.
      batch_norm: add BatchNormalization after each convolution (the "_bn" variants).
      dropout: dropout rate after each hidden dense layer.
      weight_decay: L2 factor on kernels.
      width_multiplier: scales every convolution and hidden dense width.
      stem: ``"imagenet"``, ``"cifar"`` or ``"auto"`` (cifar up to 64 px).
      bn_momentum, bn_epsilon: BatchNormalization settings when ``batch_norm``.
      classifier_activation: final activation (float32), or None for logits.
      name: model name, default ``vgg<depth>``.
    """
    key = f"vgg{depth}"
    L.check_choice("depth", depth, (11, 13, 16, 19))
    L.check_common(num_classes, include_top, pooling, width_multiplier, dropout, weight_decay)
    if input_shape is None:
        input_shape = (32, 32, 3) if stem == "cifar" else (224, 224, 3)
    stem = L.resolve_stem(stem, L.check_input_shape(input_shape, 32))
    hidden = 512 if stem == "cifar" else 4096
    w = lambda c: L.scaled(c, width_multiplier)  # noqa: E731

    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for b, widths in enumerate(CONFIGS[key], start=1):
        for c, filters in enumerate(widths, start=1):
            prefix = f"block{b}_conv{c}"
            x = keras.layers.Conv2D(
                w(filters), 3, padding="same", use_bias=not batch_norm,
                kernel_regularizer=L.l2(weight_decay), name=prefix,
            )(x)
            if batch_norm:
                x = L.batch_norm(f"{prefix}_bn", bn_momentum, bn_epsilon)(x)
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        x = keras.layers.MaxPooling2D(2, 2, name=f"block{b}_pool")(x)
    if include_top:
        x = keras.layers.Flatten(name="flatten")(x)
        for idx in (1, 2):
            x = keras.layers.Dense(w(hidden), activation="relu", kernel_regularizer=L.l2(weight_decay), name=f"fc{idx}")(x)
            if dropout:
                x = keras.layers.Dropout(dropout, name=f"fc{idx}_dropout")(x)
        x = L.classifier(x, num_classes, weight_decay, classifier_activation)
    else:
        x = L.global_pool(x, pooling)
    return keras.Model(inputs, x, name=name or key)


vgg11 = functools.partial(vgg, 11)
vgg13 = functools.partial(vgg, 13)
vgg16 = functools.partial(vgg, 16)
vgg19 = functools.partial(vgg, 19)
