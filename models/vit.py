"""Vision Transformer (Dosovitskiy et al., 2020); the Ti and S sizes are DeiT's (Touvron et al., 2020).

An image is cut into patch_size x patch_size patches by one strided
convolution; a learned class token and learned position embeddings are added;
pre-LayerNorm encoder blocks (eps 1e-6, exact GELU MLP) follow, then a final
LayerNorm and the head on the class token. Trainable parameters at 224 px, 16
px patches and 1000 classes: vit_ti16 5,717,416, vit_s16 22,050,664, vit_b16
86,567,656, vit_l16 304,326,632 (timm's exact counts; the paper rounds them, e.g. 86M).

Every encoder block is one Keras layer with one tensor in and one out, so
``tfpar.pipeline.split`` cuts between blocks and never inside attention; the
sub-layer names (``attention/query``, ``mlp1``, ``mlp2``) are what the default
DTensor rules match (``tfpar.parallel.sharding.rules``).
"""

import functools

import keras

from tfpar.models import layers as L

# size -> (width, depth, heads, mlp width); every size has 64-wide heads.
SIZES = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
}
HEAD_WIDTH = 64
POOLINGS = ("token", "avg", None)
EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="tfpar")
class ClassTokenAndPositions(keras.layers.Layer):
    """Prepends the learned class token and adds learned position embeddings: (B, N, D) -> (B, N+1, D)."""

    def build(self, input_shape):
        tokens, width = int(input_shape[-2]), int(input_shape[-1])
        self.class_token = self.add_weight(shape=(1, 1, width), initializer="zeros", name="class_token")
        self.positions = self.add_weight(
            shape=(1, tokens + 1, width), initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding")

    def call(self, inputs):
        token = keras.ops.cast(self.class_token, inputs.dtype)
        token = keras.ops.broadcast_to(token, (keras.ops.shape(inputs)[0], 1, inputs.shape[-1]))
        return keras.ops.concatenate([token, inputs], axis=1) + keras.ops.cast(self.positions, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] + 1, input_shape[2])


@keras.saving.register_keras_serializable(package="tfpar")
class EncoderBlock(keras.layers.Layer):
    """One pre-LN transformer encoder block: x + MHA(LN(x)), then y + MLP(LN(y)).

    A single layer on purpose: pipeline cuts fall between blocks, and the
    sub-layer names are stable paths for layout rules.
    """

    def __init__(self, heads, head_width, mlp_width, dropout=0.0, attention_dropout=0.0, weight_decay=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_width, self.mlp_width = heads, head_width, mlp_width
        self.dropout, self.attention_dropout, self.weight_decay = dropout, attention_dropout, weight_decay
        reg = L.l2(weight_decay)
        self.ln1 = keras.layers.LayerNormalization(epsilon=EPSILON, name="ln1", dtype=self.dtype_policy)
        self.attention = keras.layers.MultiHeadAttention(
            heads, head_width, dropout=attention_dropout, kernel_regularizer=reg, name="attention",
            dtype=self.dtype_policy)
        self.ln2 = keras.layers.LayerNormalization(epsilon=EPSILON, name="ln2", dtype=self.dtype_policy)
        self.mlp1 = keras.layers.Dense(mlp_width, activation="gelu", kernel_regularizer=reg, name="mlp1",
                                       dtype=self.dtype_policy)
        self.mlp2 = None  # its width is the input's, known in build
        self.drop = keras.layers.Dropout(dropout, name="dropout") if dropout else None

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.mlp2 = keras.layers.Dense(width, kernel_regularizer=L.l2(self.weight_decay), name="mlp2",
                                       dtype=self.dtype_policy)
        self.ln1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.ln2.build(input_shape)
        self.mlp1.build(input_shape)
        self.mlp2.build(tuple(input_shape[:-1]) + (self.mlp_width,))

    def _drop(self, x, training):
        return self.drop(x, training=training) if self.drop is not None else x

    def call(self, inputs, training=None):
        y = self.ln1(inputs)
        x = inputs + self._drop(self.attention(y, y, training=training), training)
        y = self.mlp2(self._drop(self.mlp1(self.ln2(x)), training))
        return x + self._drop(y, training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def flops_per_example(self):
        """Forward multiply-adds x 2 per image: the projections, both attention products and the MLP."""
        tokens, width = (int(d) for d in self.input.shape[1:])
        inner = self.heads * self.head_width
        projections = 2 * tokens * width * inner * 4  # query, key, value and the output
        attention = 2 * 2 * tokens * tokens * inner  # scores and the weighted sum of values
        return projections + attention + 2 * 2 * tokens * width * self.mlp_width

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "head_width": self.head_width,
                "mlp_width": self.mlp_width, "dropout": self.dropout,
                "attention_dropout": self.attention_dropout, "weight_decay": self.weight_decay}


@keras.saving.register_keras_serializable(package="tfpar")
class TokenPooling(keras.layers.Layer):
    """(B, N+1, D) -> (B, D): the class token (``"token"``) or the mean of the patch tokens (``"avg"``)."""

    def __init__(self, mode="token", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, inputs):
        if self.mode == "token":
            return inputs[:, 0]
        return keras.ops.mean(inputs[:, 1:], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def check_patches(input_shape, patch_size):
    """Validate ``patch_size`` against (H, W, C); one sentence saying what is accepted."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    shape = L.check_input_shape(input_shape, patch_size)
    if shape[0] % patch_size or shape[1] % patch_size:
        raise ValueError(f"input_shape {shape} does not divide into {patch_size}x{patch_size} patches: "
                         f"height and width must be multiples of patch_size.")
    return shape


def vit(
    size,
    num_classes=1000,
    input_shape=None,
    include_top=True,
    pooling="token",
    patch_size=16,
    dropout=0.0,
    attention_dropout=0.0,
    weight_decay=0.0,
    width_multiplier=1.0,
    blocks=None,
    classifier_activation="softmax",
    name=None,
):
    """Build ViT-``size`` (``"ti"``, ``"s"``, ``"b"`` or ``"l"``).

    Args:
      size: Ti 192 wide / 12 blocks / 3 heads, S 384/12/6, B 768/12/12,
        L 1024/24/16; the MLP is 4x as wide.
      num_classes: classes of the final layer (when ``include_top``).
      input_shape: (height, width, channels), multiples of ``patch_size``;
        default (224, 224, 3).
      include_top: the classifier after the pooled token.
      pooling: ``"token"`` (the class token, as the paper), ``"avg"`` (mean
        of the patch tokens) or, without the top, ``None`` for the whole
        (batch, patches + 1, width) sequence.
      patch_size: side of the square patches (16 in the names; 4 suits 32 px).
      dropout: rate after the embeddings, the attention and inside the MLP.
      attention_dropout: rate on the attention weights.
      weight_decay: L2 factor on kernels.
      width_multiplier: scales the head width (64), and with it the model
        width and MLP; the number of heads and blocks stays.
      blocks: encoder blocks, default the size's (12, or 24 for L); fewer
        make quick tests.
      classifier_activation: final activation (float32), or None for logits.
      name: model name, default ``vit_<size><patch_size>``.
    """
    L.check_choice("size", size, tuple(SIZES))
    L.check_common(num_classes, include_top, None, width_multiplier, dropout, weight_decay)
    L.check_choice("pooling", pooling, POOLINGS)
    if include_top and pooling is None:
        raise ValueError("pooling must be 'token' or 'avg' when include_top is True (the head needs one vector).")
    if not 0.0 <= attention_dropout < 1.0:
        raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout!r}.")
    input_shape = check_patches((224, 224, 3) if input_shape is None else input_shape, patch_size)
    _, depth, heads, _ = SIZES[size]
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"blocks must be a positive integer, got {blocks!r}.")
        depth = blocks
    head_width = L.scaled(HEAD_WIDTH, width_multiplier)
    width, mlp_width = heads * head_width, 4 * heads * head_width
    tokens = (input_shape[0] // patch_size) * (input_shape[1] // patch_size)

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.Conv2D(width, patch_size, strides=patch_size, padding="valid",
                            kernel_regularizer=L.l2(weight_decay), name="patch_embedding")(inputs)
    x = keras.layers.Reshape((tokens, width), name="patch_tokens")(x)
    x = ClassTokenAndPositions(name="embeddings")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embeddings_dropout")(x)
    for b in range(1, depth + 1):
        x = EncoderBlock(heads, head_width, mlp_width, dropout, attention_dropout, weight_decay,
                         name=f"encoder_block{b}")(x)
    x = keras.layers.LayerNormalization(epsilon=EPSILON, name="encoder_norm")(x)
    if pooling is not None:
        x = TokenPooling(pooling, name=f"{pooling}_pool")(x)
    if include_top:
        x = L.classifier(x, num_classes, weight_decay, classifier_activation)
    return keras.Model(inputs, x, name=name or f"vit_{size}{patch_size}")


def _named(size):
    builder = functools.partial(vit, size)
    builder.__name__ = builder.__qualname__ = f"vit_{size}16"
    return builder


vit_ti16 = _named("ti")
vit_s16 = _named("s")
vit_b16 = _named("b")
vit_l16 = _named("l")
