"""Data sources on small real files: read back, shard across 2 workers, reject bad input."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfpar.run import data
from tfpar.run.config import TrainConfig

SIZE = 16


def write_image(path, value, fmt):
    """A constant-colour image whose red channel encodes ``value`` (exact in PNG, near in JPEG)."""
    pixels = np.zeros((20, 24, 3), np.uint8)
    pixels[..., 0] = value
    pixels[..., 1] = 7
    Image.fromarray(pixels).save(path, format=fmt)


def decode_value(images):
    """Undo the ImageNet normalisation of channel 0 and read the encoded value back."""
    red = images[..., 0] * data.STDDEV_RGB[0] + data.MEAN_RGB[0]
    return np.round(red.reshape(len(images), -1).mean(axis=1) * 255).astype(int)


def make_folder(root, classes=3, per_class=5):
    values = {}
    for c in range(classes):
        os.makedirs(root / f"class_{c}")
        for i in range(per_class):
            value = 10 * c + i + 1
            fmt = "PNG" if i % 2 else "JPEG"
            path = root / f"class_{c}" / f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
            write_image(path, value, fmt)
            values[str(path)] = (value, c)
    (root / "class_0" / "notes.txt").write_text("ignored: not an image")
    return values


def image_example(value, label):
    buf = io.BytesIO()
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[..., 0] = value
    Image.fromarray(pixels).save(buf, format="PNG")
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def make_tfrecords(root, names, per_file=4):
    value = 1
    for name in names:
        with tf.io.TFRecordWriter(str(root / name)) as writer:
            for _ in range(per_file):
                writer.write(image_example(value, value % 5))
                value += 1
    return value - 1


def make_cifar(root, kind, n=6):
    rng = np.random.RandomState(0)
    if kind == "cifar10":
        folder, names, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, names, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    os.makedirs(folder)
    classes = 10 if kind == "cifar10" else 100
    for name in names:
        batch = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), key: list(rng.randint(0, classes, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder, names


def config(spec, **kw):
    return TrainConfig(data=spec, image_size=SIZE, **kw)


def one_epoch(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


class TwoPipelines:
    """``tf.distribute.InputContext`` for pipeline ``i`` of 2 (what 2 workers each get)."""

    @staticmethod
    def context(i):
        return tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2)


def test_folder_reads_classes_and_center_crops(tmp_path):
    values = make_folder(tmp_path)
    source = data.inspect(f"folder:{tmp_path}", num_classes=3)
    assert (source.num_classes, source.num_train + source.num_val) == (3, 15)
    assert source.num_val == 3  # 10% of 5 per class, rounded: 1 per class
    pipes = data.make(config(f"folder:{tmp_path}", num_classes=3), 4, source)
    x, y = one_epoch(pipes.val)
    assert x.shape == (3, SIZE, SIZE, 3) and x.dtype == np.float32
    expected = sorted(values[f] for f in source.val_files)
    got = sorted(zip(decode_value(x).tolist(), y.tolist()))
    # JPEG may shift a constant colour by a step or two; PNG is exact.
    assert [lab for _, lab in got] == [lab for _, lab in expected]
    assert np.abs(np.array([v for v, _ in got]) - np.array([v for v, _ in expected])).max() <= 3
    xb, yb = next(iter(pipes.train))
    assert xb.shape == (4, SIZE, SIZE, 3) and set(yb.numpy()) <= {0, 1, 2}


def test_folder_train_val_layout(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / split / c)
            for i in range(n):
                write_image(tmp_path / split / c / f"{i}.png", i + 1, "PNG")
    source = data.inspect(f"folder:{tmp_path}", num_classes=2)
    assert (source.num_train, source.num_val) == (6, 2)


def test_folder_shards_each_image_once_across_two_workers(tmp_path):
    make_folder(tmp_path, classes=2, per_class=6)
    source = data.inspect(f"folder:{tmp_path}", num_classes=2)
    cfg = config(f"folder:{tmp_path}", num_classes=2)
    seen = []
    for i in range(2):
        x, _ = one_epoch(data.make(cfg, 2, source, input_context=TwoPipelines.context(i)).val)
        seen.append(decode_value(x).tolist())
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    expected = sorted(v for f, v in zip(source.val_files, source.val_labels))
    assert len(seen[0]) + len(seen[1]) == len(expected) == source.num_val


def test_tfrecord_reads_imagenet_layout_and_splits_validation(tmp_path):
    total = make_tfrecords(tmp_path, ["train-00000-of-00002", "train-00001-of-00002", "validation-00000-of-00001"])
    source = data.inspect(f"tfrecord:{tmp_path}/*")
    assert (source.num_train, source.num_val, len(source.train_files)) == (8, 4, 2)
    assert data.count_tfrecords(str(tmp_path / "train-00000-of-00002")) == 4
    pipes = data.make(config(f"tfrecord:{tmp_path}/*", num_classes=5), 4, source)
    assert pipes.steps_per_epoch == 2
    x, y = one_epoch(pipes.val)
    assert sorted(decode_value(x).tolist()) == [9, 10, 11, 12] == list(range(9, total + 1))
    assert sorted(y.tolist()) == sorted(v % 5 for v in range(9, 13))


@pytest.mark.parametrize("files", [4, 1])
def test_tfrecord_shards_each_record_once_across_two_workers(tmp_path, files):
    """By file when there are enough files, by record when there are fewer files than workers."""
    make_tfrecords(tmp_path, [f"train-{i}" for i in range(files)] + ["validation-0"], per_file=12 // files)
    cfg = config(f"tfrecord:{tmp_path}", num_classes=5)
    source = data.inspect(cfg.data)
    seen = []
    for i in range(2):
        ds = data._split(source, "train", cfg, 3, 1, 0, TwoPipelines.context(i))
        xs = [decode_value(x.numpy()) for x, _ in ds.take(2)]  # 2 batches of 3 = 6 = half of 12
        seen.append(np.concatenate(xs).tolist())
    assert sorted(seen[0] + seen[1]) == list(range(1, 13))
    keras_policy = data.make(cfg, 4, source, num_workers=2).train.options().experimental_distribute.auto_shard_policy
    expected = "OFF" if files >= 2 else "DATA"  # enough files: split by file here; else tf.data's DATA
    assert keras_policy == getattr(tf.data.experimental.AutoShardPolicy, expected)


def test_tfrecord_keras_path_gives_each_worker_its_own_files(tmp_path):
    """Under multi-worker fit each worker reads only its files (FILE-style split), autoshard off."""
    make_tfrecords(tmp_path, [f"train-{i}" for i in range(4)], per_file=2)
    cfg = config(f"tfrecord:{tmp_path}", num_classes=5, seed=1)
    source = data.inspect(cfg.data)
    seen = []
    for i in range(2):
        ds = data.make(cfg, 2, source, num_workers=2, worker_index=i).train
        assert ds.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
        seen.append(sorted(set(np.concatenate([decode_value(x.numpy()) for x, _ in ds.take(8)]).tolist())))
    assert sorted(seen[0] + seen[1]) == list(range(1, 9))  # each worker repeats its own 2 files only


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickles_from_folder_and_tar(tmp_path, kind):
    folder, names = make_cifar(tmp_path, kind)
    source = data.inspect(f"{kind}:{tmp_path}", num_classes=10 if kind == "cifar10" else 100)
    n_train = 6 * (5 if kind == "cifar10" else 1)
    assert (source.num_train, source.num_val) == (n_train, 6)
    with open(folder / names[-1], "rb") as f:
        raw = pickle.load(f)
    first = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(source.arrays[1][0][0], first)  # CHW rows -> HWC images, in order
    tar = tmp_path / f"{kind}.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    from_tar = data.inspect(f"{kind}:{tar}", num_classes=source.num_classes)
    np.testing.assert_array_equal(from_tar.arrays[0][0], source.arrays[0][0])
    cfg = TrainConfig(data=f"{kind}:{tar}", image_size=32, num_classes=source.num_classes)
    x, y = one_epoch(data.make(cfg, 4, from_tar).val)
    np.testing.assert_array_equal(y, raw[b"labels" if kind == "cifar10" else b"fine_labels"])
    expected = (first / 255.0 - data.MEAN_RGB) / data.STDDEV_RGB
    np.testing.assert_allclose(x[0], expected, atol=1e-5)


def test_in_memory_sources_shard_each_example_once():
    cfg = TrainConfig(data="digits", image_size=8)
    source = data.inspect("digits", 10)
    labels = [one_epoch(data.make(cfg, 2, source, input_context=TwoPipelines.context(i)).val)[1] for i in range(2)]
    assert len(labels[0]) + len(labels[1]) == 297
    full = one_epoch(data.make(cfg, 64, source).val)[1]
    np.testing.assert_array_equal(np.sort(np.concatenate(labels)), np.sort(full))
    interleaved = np.empty(297, np.int32)
    interleaved[0::2], interleaved[1::2] = labels[0], labels[1]  # shard(2, i) takes every other example
    np.testing.assert_array_equal(interleaved, full)
    policy = data.make(cfg, 64, source).train.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA


def test_synthetic_is_endless_random_data_of_the_model_size():
    cfg = TrainConfig(data="synthetic", image_size=SIZE, num_classes=7)
    pipes = data.make(cfg, 8, data.inspect("synthetic", 7))
    assert (pipes.steps_per_epoch, pipes.validation_steps) == data.SYNTHETIC_STEPS
    batches = list(pipes.train.take(3))
    assert all(x.shape == (8, SIZE, SIZE, 3) for x, _ in batches)
    assert all(0 <= int(y.numpy().min()) and int(y.numpy().max()) < 7 for _, y in batches)


def test_validation_steps_0_skips_validation():
    for spec, source in (("synthetic", data.inspect("synthetic", 10)), ("digits", None)):
        pipes = data.make(TrainConfig(data=spec, image_size=SIZE, num_classes=10, validation_steps=0), 8, source)
        assert pipes.val is None and pipes.validation_steps == 0 and pipes.train is not None
    with pytest.raises(ValueError, match=r"validation_steps must be an integer >= 0 when given, got -1\."):
        TrainConfig(validation_steps=-1).validate()


def test_augmentation_is_deterministic_with_the_seed(tmp_path):
    make_folder(tmp_path, classes=2, per_class=4)
    firsts = []
    for seed in (3, 3, 4):
        cfg = config(f"folder:{tmp_path}", num_classes=2, seed=seed)
        firsts.append(next(iter(data.make(cfg, 4).train))[0].numpy())
    np.testing.assert_array_equal(firsts[0], firsts[1])
    assert not np.array_equal(firsts[0], firsts[2])


def write_textured(path, value):
    """Red encodes ``value``; green and blue are gradients, so crops and flips show in the pixels."""
    pixels = np.zeros((20, 24, 3), np.uint8)
    pixels[..., 0] = value
    pixels[..., 1] = np.arange(24, dtype=np.uint8)[None, :] * 10
    pixels[..., 2] = np.arange(20, dtype=np.uint8)[:, None] * 12
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_skip_batches_resumes_at_the_exact_example_with_the_same_augmentation(tmp_path, kind):
    """After k skipped steps the pipeline yields, bit for bit, what an uninterrupted one yields from step k+1."""
    if kind == "folder":
        for i in range(10):
            os.makedirs(tmp_path / f"c{i % 2}", exist_ok=True)
            write_textured(tmp_path / f"c{i % 2}" / f"{i}.png", i + 1)
    else:
        for f in range(2):
            with tf.io.TFRecordWriter(str(tmp_path / f"train-{f}")) as writer:
                for i in range(5):
                    encoded = write_textured(tmp_path / "scratch.png", 5 * f + i + 1)
                    writer.write(tf.train.Example(features=tf.train.Features(feature={
                        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2])),
                    })).SerializeToString())
        os.remove(tmp_path / "scratch.png")
    cfg = config(f"{kind}:{tmp_path}", num_classes=2, seed=5)
    source = data.inspect(cfg.data, 2, cfg.seed)
    whole = [(x.numpy(), y.numpy()) for x, y in data.make(cfg, 3, source).train.take(7)]  # crosses 2 passes
    resumed = [(x.numpy(), y.numpy()) for x, y in data.make(cfg, 3, source, skip_batches=4).train.take(3)]
    for (x, y), (rx, ry) in zip(whole[4:], resumed):
        np.testing.assert_array_equal(rx, x)  # same images, same crops and flips
        np.testing.assert_array_equal(ry, y)
    assert len({v for x, _ in whole for v in decode_value(x)}) > 3  # the batches differ: a real order was checked


@pytest.mark.parametrize("make_bad, spec, message", [
    (lambda p: None, "folder:{p}/missing", "does not exist"),
    (lambda p: None, "folder:{p}", "no class folders"),
    (lambda p: (os.makedirs(p / "a"), (p / "a" / "x.jpg").write_bytes(b"not a jpeg")), "folder:{p}", "not a readable JPEG"),
    (lambda p: None, "tfrecord:{p}/*.tfrecord", "No TFRecord files"),
    (lambda p: (p / "train-0").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00abcd"), "tfrecord:{p}", "truncated"),
    (lambda p: None, "cifar10:{p}", "lacks the cifar10 file"),
    (lambda p: None, "cifar100:{p}/nope.tar.gz", "does not exist"),
    (lambda p: None, "imagenet:{p}", "Unknown data source"),
    (lambda p: None, "folder:", "needs a path"),
    (lambda p: None, "digits:{p}", "takes no path"),
])
def test_bad_sources_raise_one_sentence(tmp_path, make_bad, spec, message):
    make_bad(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        data.inspect(spec.format(p=tmp_path))
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_num_classes_must_match_the_data(tmp_path):
    make_folder(tmp_path, classes=3, per_class=2)
    with pytest.raises(ValueError, match="has 3 classes but num_classes=10"):
        data.inspect(f"folder:{tmp_path}", num_classes=10)
