"""ResNet v1.5 (He et al., 2015; stride on the 3x3 convolution of bottlenecks).

Convolutions carry no bias (BN follows each one). Trainable parameters at
1000 classes: resnet18 11,689,512, resnet34 21,797,672, resnet50 25,557,032,
resnet101 44,549,160, resnet152 60,192,808. The small-image stem is a 3x3
stride-1 convolution with no max-pool, so 32x32 inputs keep their detail.
BatchNormalization is tfpar's fused layer (see ``layers.py``), and the last BN
of every residual branch starts at zero gamma when ``zero_init_residual``.
"""

import functools

import keras

from tfpar.models import layers as L

# depth -> (block kind, blocks per stage)
CONFIGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def resnet(
    depth,
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling="avg",
    dropout=0.0,
    weight_decay=0.0,
    width_multiplier=1.0,
    stem="auto",
    bn_momentum=0.9,
    bn_epsilon=1.001e-5,
    zero_init_residual=False,
    classifier_activation="softmax",
    name=None,
):
    """Build ResNet-``depth`` (18, 34, 50, 101 or 152).

    Args:
      depth: 18, 34 (basic blocks) or 50, 101, 152 (bottleneck blocks).
      num_classes: classes of the final layer (when ``include_top``).
      input_shape: (height, width, channels); default (224, 224, 3), or
        (32, 32, 3) when ``stem="cifar"``.
      include_top: global average pooling and the classifier.
      pooling: ``None``, ``"avg"`` or ``"max"``, used only without the top.
      dropout: dropout rate before the classifier.
      weight_decay: L2 factor on convolution and dense kernels.
      width_multiplier: scales every stage's width (0.25 for fast tests).
      stem: ``"imagenet"`` (7x7 stride-2 convolution and 3x3 max-pool),
        ``"cifar"`` (3x3 stride-1 convolution, no pool) or ``"auto"``
        (cifar for inputs up to 64 px).
      bn_momentum: moving-statistics momentum. 0.9 suits short runs; Keras's
        0.99 needs thousands of steps before validation accuracy is right
        (DESIGN.md item 13).
      bn_epsilon: BatchNormalization epsilon.
      zero_init_residual: start each residual branch's last BN gamma at 0.
      classifier_activation: final activation (float32), or None for logits.
      name: model name, default ``resnet<depth>``.
    """
    L.check_choice("depth", depth, tuple(CONFIGS))
    L.check_common(num_classes, include_top, pooling, width_multiplier, dropout, weight_decay)
    if input_shape is None:
        input_shape = (32, 32, 3) if stem == "cifar" else (224, 224, 3)
    stem = L.resolve_stem(stem, L.check_input_shape(input_shape, 8))
    kind, blocks = CONFIGS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    reg = L.l2(weight_decay)

    def conv(x, filters, kernel, strides, name):
        if strides > 1 and kernel > 1:
            # Explicit padding matches the reference implementations' outputs
            # at odd sizes and keeps the kernel centred for stride 2.
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same"
        return keras.layers.Conv2D(
            filters, kernel, strides=strides, padding=padding, use_bias=False,
            kernel_regularizer=reg, name=name,
        )(x)

    def bn(x, name, zero=False):
        layer = L.batch_norm(name, bn_momentum, bn_epsilon)
        if zero:
            layer.gamma_initializer = keras.initializers.Zeros()
        return layer(x)

    def block(x, width, strides, name):
        out_width = width * expansion
        shortcut = x
        if strides != 1 or x.shape[-1] != out_width:
            shortcut = conv(x, out_width, 1, strides, f"{name}_0_conv")
            shortcut = bn(shortcut, f"{name}_0_bn")
        if kind == "basic":
            y = conv(x, width, 3, strides, f"{name}_1_conv")
            y = keras.layers.ReLU(name=f"{name}_1_relu")(bn(y, f"{name}_1_bn"))
            y = conv(y, width, 3, 1, f"{name}_2_conv")
            y = bn(y, f"{name}_2_bn", zero=zero_init_residual)
        else:
            y = conv(x, width, 1, 1, f"{name}_1_conv")
            y = keras.layers.ReLU(name=f"{name}_1_relu")(bn(y, f"{name}_1_bn"))
            y = conv(y, width, 3, strides, f"{name}_2_conv")
            y = keras.layers.ReLU(name=f"{name}_2_relu")(bn(y, f"{name}_2_bn"))
            y = conv(y, out_width, 1, 1, f"{name}_3_conv")
            y = bn(y, f"{name}_3_bn", zero=zero_init_residual)
        y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
        return keras.layers.ReLU(name=f"{name}_out")(y)

    inputs = keras.Input(shape=input_shape, name="images")
    stem_width = L.scaled(64, width_multiplier)
    if stem == "cifar":
        x = conv(inputs, stem_width, 3, 1, "stem_conv")
        x = keras.layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
    else:
        x = conv(inputs, stem_width, 7, 2, "stem_conv")
        x = keras.layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, 2, name="stem_pool")(x)
    for s, (width, count) in enumerate(zip(STAGE_WIDTHS, blocks), start=2):
        for b in range(1, count + 1):
            strides = 2 if (b == 1 and s > 2) else 1
            x = block(x, L.scaled(width, width_multiplier), strides, f"conv{s}_block{b}")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        x = L.classifier(x, num_classes, weight_decay, classifier_activation)
    else:
        x = L.global_pool(x, pooling)
    return keras.Model(inputs, x, name=name or f"resnet{depth}")


resnet18 = functools.partial(resnet, 18)
resnet34 = functools.partial(resnet, 34)
resnet50 = functools.partial(resnet, 50)
resnet101 = functools.partial(resnet, 101)
resnet152 = functools.partial(resnet, 152)
