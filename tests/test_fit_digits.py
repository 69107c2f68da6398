"""A short fit on the real bundled digits drives the loss down, for each family."""

import numpy as np
import pytest
import keras

from tfpar.run import data
from tfpar import models


@pytest.mark.parametrize("name", ["alexnet_bn", "vgg11_bn", "resnet18"])
def test_short_fit_on_digits_lowers_the_loss(name):
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = data.load_digits(image_size=32, seed=0)
    assert x.shape[1:] == (32, 32, 3) and len(x) + len(x_val) == 1797
    assert set(np.unique(y)) == set(range(10))
    model = models.build(name, input_shape=(32, 32, 3), num_classes=10, width_multiplier=0.125, dropout=0.0)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = data.from_arrays(x, y, 64, training=True, seed=0)
    history = model.fit(ds, epochs=3, steps_per_epoch=12, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert history.history["accuracy"][-1] > 0.5
