"""Costs of the cuttable units and the cuts that minimise the slowest stage.

``"time"`` (the default) times each unit's forward and backward on a stage
device with one micro-batch; ``"flops"``, ``"params"`` and ``"layers"`` count.
The best cuts come from an exact dynamic programme over contiguous
partitions, so the answer is the true minimum of the largest stage cost for
the unit costs given (times are taken per unit and added up per stage).
Parameters are a poor guide for AlexNet and VGG: the dense layers hold most
weights while the convolutions do most of the work (docs/pipeline.md).
"""

import itertools
import math
import time

import numpy as np

KINDS = ("time", "flops", "params", "layers")


def check(balance):
    """``balance`` as a kind name or a list of cut-layer names; one sentence when it is neither."""
    names = []
    if isinstance(balance, str):
        if balance in KINDS:
            return balance
        names = [n.strip() for n in balance.split(",") if n.strip()]
    elif isinstance(balance, (list, tuple)) and all(isinstance(n, str) for n in balance):
        names = list(balance)
    if not names:
        raise ValueError(f"balance must be one of {', '.join(KINDS)} or a list of cut-layer names, got {balance!r}.")
    return names


def best_partition(costs, stages):
    """Split ``costs`` (one per unit, in order) into ``stages`` non-empty runs minimising the largest sum.

    Returns ``(counts, best)``: units per stage, and the largest stage sum.
    Exact: dynamic programming over (units used, stages used), O(stages n^2).
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"Cannot split {n} units into {stages} stages.")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))])
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    counts, j = [], n
    for k in range(stages, 0, -1):
        i = choice[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1], float(best[stages][n])


def best_round_robin(costs, stages, devices, limit=200_000):
    """Cuts for stages placed round-robin on ``devices`` (stage s on device s mod D), minimising the busiest
    device's summed cost, then the slowest stage.

    Interleaved 1F1B keeps each device busy with all of its V stages, so the
    busiest device sets the step time. Exact by enumerating the contiguous
    partitions when there are at most ``limit`` of them; beyond that, the
    stage DP (``best_partition``). Returns ``(counts, busiest device's cost)``.
    """
    n = len(costs)
    if devices >= stages or math.comb(n - 1, stages - 1) > limit:
        counts, _ = best_partition(costs, stages)
    else:
        prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))]).tolist()
        best_key, counts = None, None
        for cuts in itertools.combinations(range(1, n), stages - 1):
            bounds = (0,) + cuts + (n,)
            sums = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
            key = (max(sum(sums[d::devices]) for d in range(devices)), max(sums))
            if best_key is None or key < best_key:
                best_key, counts = key, [b - a for a, b in zip(bounds, bounds[1:])]
    starts = np.cumsum([0] + counts[:-1])
    sums = [float(sum(costs[a:a + c])) for a, c in zip(starts, counts)]
    return counts, max(sum(sums[d::devices]) for d in range(devices))


def layer_flops(layer):
    """Forward multiply-adds x 2 per image of one layer (convolutions and dense exactly, others ~1 per output)."""
    import keras

    own = getattr(layer, "flops_per_example", None)  # a block that counts itself (tfpar.models.vit.EncoderBlock)
    if callable(own):
        return int(own())
    out = layer.output.shape[1:]
    outputs = int(np.prod([d for d in out if d is not None])) if out else 1
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = layer.input.shape[-1] // layer.groups
        return 2 * outputs * kh * kw * cin
    if isinstance(layer, keras.layers.Dense):
        return 2 * outputs * layer.input.shape[-1]
    return outputs


def layer_params(layer):
    return int(sum(np.prod(w.shape) for w in layer.weights))


def unit_costs(unit_list, kind):
    """Per-unit cost for ``kind`` in ``("flops", "params", "layers")``."""
    if kind == "flops":
        return [sum(layer_flops(l) for l in u.layers) for u in unit_list]
    if kind == "params":
        return [sum(layer_params(l) for l in u.layers) for u in unit_list]
    return [sum(1 for l in u.layers if l.weights) or 0.0 for u in unit_list]


def time_units(unit_list, micro_batch, device, repeats=3):
    """Milliseconds of one forward and backward of each unit on ``device`` with ``micro_batch`` images.

    Moving statistics and other non-trainable state are restored afterwards,
    so timing leaves the model as it was.
    """
    import tensorflow as tf

    from tfpar.parallel.pipeline import partition

    result = []
    for i, unit in enumerate(unit_list):
        segment = partition.segment_model(unit_list, i, i, name=f"timed_unit{i}")
        saved = [v.numpy() for v in segment.non_trainable_variables]
        weights = segment.trainable_weights
        shape = (micro_batch,) + tuple(unit.input.shape[1:])
        dtype = unit.input.dtype

        @tf.function
        def forward_backward(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = segment(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32))
            return tape.gradient(loss, [x] + list(weights))

        with tf.device(device):
            x = tf.cast(tf.random.normal(shape), dtype) if "float" in str(dtype) else tf.zeros(shape, dtype)
            forward_backward(x)  # trace and warm up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = forward_backward(x)
                [o.numpy() for o in out if o is not None]  # wait for the result
                times.append(time.perf_counter() - start)
        for v, value in zip(segment.non_trainable_variables, saved):
            v.assign(value)
        result.append(1000 * float(np.median(times)))
    return result


def table(unit_list, counts, devices, dtype_bytes=None, times=None):
    """The stage table: one dict per stage (device, layers, params, flops per image, ms, cut bytes per image)."""
    rows, start = [], 0
    for s, count in enumerate(counts):
        chunk = unit_list[start:start + count]
        layers = [l for u in chunk for l in u.layers]
        out = chunk[-1].output
        crossing = None
        if s < len(counts) - 1:
            size = int(np.prod(out.shape[1:]))
            crossing = size * (dtype_bytes or np.dtype(_np_dtype(out.dtype)).itemsize)
        rows.append({
            "stage": s, "device": devices[s], "first_layer": layers[0].name, "last_layer": layers[-1].name,
            "layers": len(layers), "params": sum(layer_params(l) for l in layers),
            "flops_per_image": sum(layer_flops(l) for l in layers),
            "ms": round(sum(times[start:start + count]), 3) if times else None,
            "cut_bytes_per_image": crossing,
        })
        start += count
    return rows


def _np_dtype(dtype):
    return {"bfloat16": "float16"}.get(str(dtype), str(dtype))  # same width


def format_table(rows):
    """The stage table as aligned text."""
    head = f"{'stage':>5} {'device':<28} {'layers':>6} {'params':>12} {'MFLOPs/img':>11} {'ms':>9} " \
           f"{'cut KB/img':>10}  layers"
    lines = [head]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else "-"
        cut = f"{r['cut_bytes_per_image'] / 1024:.1f}" if r["cut_bytes_per_image"] is not None else "-"
        lines.append(f"{r['stage']:>5} {r['device'][-28:]:<28} {r['layers']:>6} {r['params']:>12,} "
                     f"{r['flops_per_image'] / 1e6:>11.2f} {ms:>9} {cut:>10}  {r['first_layer']}..{r['last_layer']}")
    for device, held in per_device(rows).items():
        if len(held) > 1:
            ms = [r["ms"] for r in rows if r["device"] == device]
            total = f", {sum(ms):.2f} ms" if None not in ms else ""
            lines.append(f"device {device[-28:]} holds stages {', '.join(map(str, held))}: "
                         f"{sum(r['params'] for r in rows if r['device'] == device):,} params"
                         f", {sum(r['flops_per_image'] for r in rows if r['device'] == device) / 1e6:.2f} "
                         f"MFLOPs/img{total}")
    return "\n".join(lines)


def per_device(rows):
    """``{device: [stage, ...]}`` of a stage table: interleaved 1F1B puts several stages on one device."""
    found = {}
    for r in rows:
        found.setdefault(r["device"], []).append(r["stage"])
    return found
