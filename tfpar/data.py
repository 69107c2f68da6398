"""Input sources -> ``tf.data`` pipelines ready for a strategy.

The batch size handed in is always the *global* batch; the pipeline is
batched once with it and ``strategy.experimental_distribute_dataset`` (done
by Keras's ``fit``) splits it across replicas.
"""

import numpy as np
import tensorflow as tf


def load_digits(image_size=32, channels=3, validation_fraction=0.165, seed=0):
    """scikit-learn's bundled real 8x8 handwritten digits (1,797 images), offline.

    Returns ``(x_train, y_train), (x_val, y_val)``: float32 images in [0, 1],
    resized to ``image_size`` and repeated to ``channels``; int32 labels 0-9.
    The split is a fixed, stratified shuffle by ``seed``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = (digits.images.astype("float32") / 16.0)[..., None]
    labels = digits.target.astype("int32")
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    images = np.repeat(images, channels, axis=-1) if channels > 1 else images
    rng = np.random.RandomState(seed)
    train_idx, val_idx = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(idx) * validation_fraction))
        val_idx.extend(idx[:cut])
        train_idx.extend(idx[cut:])
    train_idx, val_idx = rng.permutation(train_idx), rng.permutation(val_idx)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def from_arrays(x, y, global_batch_size, training, seed=0, drop_remainder=True):
    """A batched, prefetched dataset of in-memory arrays (shuffled and repeated for training)."""
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
