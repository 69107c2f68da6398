"""``scripts/benchmark.py --only keras_distribution``: Keras's own distribution API on TensorFlow (tfpar).

A tiny keras-hub Gemma backbone trained by plain ``fit`` on the same logical
CPUs three ways: tfpar's mirrored strategy, ``keras.distribution.DataParallel``
and ``ModelParallel`` with Gemma's own ``get_layout_map`` on a 2x2 mesh. The
rate is sequences/sec (tokens/sec = that x ``seq``). The first case also
counts parameter and Adam bytes per device for a Gemma-7B-shaped backbone on a
batch=2,model=4 mesh without allocating its weights (TF stores one zero per
variable; Keras keeps the shapes) (replicated, model-sharded, and
FSDP-style: Gemma's map, which also splits weights over ``batch``). Where
``jax`` is importable (``pip install -e ".[bench]"``), the same two
``keras.distribution`` ways also run on Keras's JAX backend, the reference
implementation, on 4 XLA host devices over the same 2 cores.

Run alone: ``python scripts/bench_keras_distribution.py`` prints the memory table.
"""

import importlib.util
import os
import sys

GEMMA_TINY = dict(vocabulary_size=256, num_layers=2, num_query_heads=4, num_key_value_heads=4, hidden_dim=64,
                  intermediate_dim=256, head_dim=16)
GEMMA_7B = dict(vocabulary_size=256000, num_layers=28, num_query_heads=16, num_key_value_heads=16, hidden_dim=3072,
                intermediate_dim=49152, head_dim=256)  # keras-hub's gemma_7b_en shapes
MEMORY_MESH = {"batch": 2, "model": 4}


def cases(base):
    """The comparison: mirrored first (the ratio's base), then the two keras.distribution ways (and on JAX)."""
    tiny = dict(base, kind="keras_distribution", model="gemma_tiny", batch=16, seq=32, virtual_cpus=4)
    found = [dict(tiny, name="gemma tiny, tfpar mirrored x4 (sequences/sec)", way="mirrored", memory=True),
             dict(tiny, name="gemma tiny, keras.distribution.DataParallel x4", way="data_parallel"),
             dict(tiny, name="gemma tiny, ModelParallel batch=2,model=2, Gemma's layout map", way="model_parallel")]
    if importlib.util.find_spec("jax") is not None:
        found += [dict(tiny, name="gemma tiny, Keras 3 on JAX, DataParallel x4", way="jax_data_parallel"),
                  dict(tiny, name="gemma tiny, Keras 3 on JAX, ModelParallel batch=2,model=2, Gemma's layout map",
                       way="jax_model_parallel")]
    return found


def _data(case):
    import numpy as np

    rng = np.random.RandomState(0)
    n = case["batch"] * case["steps"]
    x = {"token_ids": rng.randint(0, GEMMA_TINY["vocabulary_size"], (n, case["seq"])).astype("int32"),
         "padding_mask": np.ones((n, case["seq"]), "int32")}
    return x, rng.rand(n, case["seq"], GEMMA_TINY["hidden_dim"]).astype("float32")


def _distribution(keras, keras_hub, way):
    names = keras.distribution.list_devices()
    if way.endswith("data_parallel"):
        return keras.distribution.DataParallel(devices=names)
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices=names)
    return keras.distribution.ModelParallel(layout_map=keras_hub.models.GemmaBackbone.get_layout_map(mesh),
                                            batch_dim_name="batch")


def _measure_jax(case, window_timer):
    """The same model, data and fit on Keras's JAX backend (a fresh process: the backend is chosen at import)."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={case['virtual_cpus']}"
    import keras
    import keras_hub

    x, y = _data(case)
    with _distribution(keras, keras_hub, case["way"]).scope():
        model = keras_hub.models.GemmaBackbone(**GEMMA_TINY)
        model.compile(keras.optimizers.Adam(1e-3), "mse")
    timer = window_timer(keras, case["batch"], case["warmup_windows"])
    model.fit(x, y, batch_size=case["batch"], epochs=case["windows"] + case["warmup_windows"], verbose=0,
              shuffle=False, callbacks=[timer])
    return {"rates": timer.rates, "params": int(model.count_params()), "seq": case["seq"],
            "tokens_per_sec": [r * case["seq"] for r in timer.rates], "backend": "jax"}


def measure(case, window_timer):
    if case["way"].startswith("jax_"):
        return _measure_jax(case, window_timer)
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    from tfpar.core import devices

    devices.configure_virtual_cpus(case["virtual_cpus"])
    import keras
    import keras_hub

    import tfpar.compat
    from tfpar import strategies

    tfpar.compat.apply()
    x, y = _data(case)
    way = case["way"]
    scope = strategies.create("mirrored").scope() if way == "mirrored" else _distribution(keras, keras_hub, way).scope()
    with scope:
        model = keras_hub.models.GemmaBackbone(**GEMMA_TINY)
        model.compile(keras.optimizers.Adam(1e-3), "mse")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(case["batch"], drop_remainder=True).repeat()
    timer = window_timer(keras, case["batch"], case["warmup_windows"])
    model.fit(data, epochs=case["windows"] + case["warmup_windows"], steps_per_epoch=case["steps"], verbose=0,
              callbacks=[timer])
    out = {"rates": timer.rates, "params": int(model.count_params()), "seq": case["seq"],
           "tokens_per_sec": [r * case["seq"] for r in timer.rates]}
    if case.get("memory"):
        out["memory"] = memory_table()
        if importlib.util.find_spec("jax") is None:
            out["jax"] = "skipped: jax is not installed (pip install -e .[bench] adds jax[cpu])"
    return out


def _maps(mesh_shape):
    """Replicated, model-sharded (Gemma's map without its batch axis) and FSDP-style (Gemma's own map)."""
    import keras
    import keras_hub

    names = [f"cpu:{i}" for i in range(mesh_shape["batch"] * mesh_shape["model"])]  # names only, no devices
    mesh = keras.distribution.DeviceMesh(tuple(mesh_shape.values()), list(mesh_shape), devices=names)
    fsdp = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    model_only = keras.distribution.LayoutMap(mesh)
    for key in fsdp:
        model_only[key] = tuple(None if axis == "batch" else axis for axis in fsdp[key].axes)
    return {"replicated (DataParallel)": [], "model-sharded (Gemma's map, model axis only)": model_only,
            "FSDP-style (Gemma's own map)": fsdp}


def memory_table(config=GEMMA_7B, mesh_shape=MEMORY_MESH):
    """Parameter and parameter+Adam bytes per device for each map, from the weights' shapes only."""
    import keras_hub
    import numpy as np
    import tensorflow as tf

    from tfpar.parallel.sharding import rules as rules_lib

    def scalar_storage(next_creator, **kwargs):
        # Keras keeps each variable's shape itself; TF holds one zero per variable instead of its values.
        return next_creator(**dict(kwargs, initial_value=tf.zeros((), kwargs.get("dtype") or tf.float32)))

    with tf.variable_creator_scope(scalar_storage):
        weights = [(w.path, tuple(int(d) for d in w.shape), np.dtype(w.dtype).itemsize)
                   for w in keras_hub.models.GemmaBackbone(**config).weights]
    rows = {}
    for name, layout_map in _maps(mesh_shape).items():
        total = per_device = 0
        for path, shape, itemsize in weights:
            spec = rules_lib.resolve(layout_map, path, shape, mesh_shape)
            total += int(np.prod(shape)) * itemsize
            per_device += int(np.prod(rules_lib.shard_shape(shape, spec, mesh_shape))) * itemsize
        rows[name] = {"param_gib_per_device": per_device / 2**30, "param_and_adam_gib_per_device": 3 * per_device / 2**30,
                      "param_gib_total": total / 2**30}
    return {"model": "GemmaBackbone 7B shapes", "mesh": mesh_shape, "rows": rows}


def markdown(table):
    mesh = ",".join(f"{k}={v}" for k, v in table["mesh"].items())
    lines = [f"{table['model']} on {mesh}, float32, Adam (2 slots in each weight's layout):", "",
             "| layout | parameters GiB/device | + Adam GiB/device |", "|---|---:|---:|"]
    for name, row in table["rows"].items():
        lines.append(f"| {name} | {row['param_gib_per_device']:.2f} | {row['param_and_adam_gib_per_device']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    print(markdown(memory_table()))
