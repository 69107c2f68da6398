"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012), single-tower form.

Five convolutions (96-256-384-384-256) and two 4096-wide dense layers with
dropout. Local response normalisation is left out (it has no parameters and
later work found it unhelpful); ``batch_norm=True`` adds BN after every
convolution instead. At 227x227 and 1000 classes, without BN, the network has
exactly 62,378,344 parameters.
"""

import keras

from tfpar.models import layers as L


def alexnet(
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
    name="alexnet",
):
    """Build AlexNet.

    Args:
      num_classes: classes of the final layer (when ``include_top``).
      input_shape: (height, width, channels); default (227, 227, 3), or
        (32, 32, 3) when ``stem="cifar"``.
      include_top: add the 4096-4096 dense classifier. Without it the output
        is the last convolution's feature map, optionally pooled by ``pooling``.
      pooling: ``None``, ``"avg"`` or ``"max"``, used only without the top.
      batch_norm: add BatchNormalization after each convolution.
      dropout: dropout rate before each hidden dense layer.
      weight_decay: L2 factor on convolution and dense kernels.
      width_multiplier: scales every convolution and hidden dense width.
      stem: ``"imagenet"`` (11x11 stride-4 first convolution, 227 px input),
        ``"cifar"`` (3x3 stride-1 convolutions and 2x2 pooling for 32 px
        inputs) or ``"auto"`` (cifar for inputs up to 64 px).
      bn_momentum, bn_epsilon: BatchNormalization settings when ``batch_norm``.
      classifier_activation: final activation (float32), or None for logits.
      name: model name.
    """
    L.check_common(num_classes, include_top, pooling, width_multiplier, dropout, weight_decay)
    if input_shape is None:
        input_shape = (32, 32, 3) if stem == "cifar" else (227, 227, 3)
    stem = L.resolve_stem(stem, L.check_input_shape(input_shape, 1))
    small = stem == "cifar"
    L.check_input_shape(input_shape, 16 if small else 63)
    w = lambda c: L.scaled(c, width_multiplier)  # noqa: E731

    def conv(x, filters, kernel, strides, padding, idx):
        x = keras.layers.Conv2D(
            w(filters), kernel, strides=strides, padding=padding, use_bias=not batch_norm,
            kernel_regularizer=L.l2(weight_decay), name=f"conv{idx}",
        )(x)
        if batch_norm:
            x = L.batch_norm(f"conv{idx}_bn", bn_momentum, bn_epsilon)(x)
        return keras.layers.ReLU(name=f"conv{idx}_relu")(x)

    def pool(x, idx):
        if small:
            return keras.layers.MaxPooling2D(2, 2, name=f"pool{idx}")(x)
        return keras.layers.MaxPooling2D(3, 2, name=f"pool{idx}")(x)

    inputs = keras.Input(shape=input_shape, name="images")
    if small:
        x = conv(inputs, 96, 3, 1, "same", 1)
    else:
        x = conv(inputs, 96, 11, 4, "valid", 1)
    x = pool(x, 1)
    x = conv(x, 256, 3 if small else 5, 1, "same", 2)
    x = pool(x, 2)
    x = conv(x, 384, 3, 1, "same", 3)
    x = conv(x, 384, 3, 1, "same", 4)
    x = conv(x, 256, 3, 1, "same", 5)
    x = pool(x, 5)
    if include_top:
        x = keras.layers.Flatten(name="flatten")(x)
        for idx in (6, 7):
            if dropout:
                x = keras.layers.Dropout(dropout, name=f"fc{idx}_dropout")(x)
            x = keras.layers.Dense(w(4096), activation="relu", kernel_regularizer=L.l2(weight_decay), name=f"fc{idx}")(x)
        x = L.classifier(x, num_classes, weight_decay, classifier_activation)
    else:
        x = L.global_pool(x, pooling)
    return keras.Model(inputs, x, name=name)
