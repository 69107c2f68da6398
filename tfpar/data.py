"""Public API: input pipelines, offline datasets and ``tfpar.data.make`` (the code is ``tfpar.run.data``)."""

from tfpar.run.data import (KINDS, Pipelines, Source, center_crop, count_tfrecords, from_arrays, inspect,
                            load_digits, make, parse, random_resized_crop)

__all__ = ["KINDS", "Pipelines", "Source", "center_crop", "count_tfrecords", "from_arrays", "inspect",
           "load_digits", "make", "parse", "random_resized_crop"]
