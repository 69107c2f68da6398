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


def round_robin_step(sums, devices, micro_batches):
    """A step's length in cost units for stage costs ``sums`` placed round-robin on ``devices``.

    In steady state every device runs each of its V stages once per micro-batch, so ``micro_batches``
    times the busiest device's summed stages; filling and draining the pipeline adds about (D - 1) times
    the slowest stage, which is the (D - 1) / (V·M + D - 1) bubble when stages are equal.
    """
    busiest = max(sum(sums[d::devices]) for d in range(devices))
    return micro_batches * busiest + (devices - 1) * max(sums)


def best_round_robin(costs, stages, devices, micro_batches=None, limit=200_000):
    """Cuts for stages placed round-robin on ``devices`` (stage s on device s mod D), minimising the step
    of ``round_robin_step`` at ``micro_batches`` (default V x D): the busiest device's summed cost, and
    the slowest stage, which sets the fill and drain.

    Balancing only the devices' sums let the slowest stage grow without bound: ViT-S/16 in 4 stages on 2
    processes was cut into stages of 280, 356, 75 and 1 ms (sums 355 and 357), and ran at 0.76x 1F1B's
    speed. Exact by enumerating the contiguous partitions when there are at most ``limit`` of them;
    beyond that, the stage DP (``best_partition``). Returns ``(counts, busiest device's cost)``.
    """
    n = len(costs)
    micro_batches = micro_batches or stages
    if devices >= stages or math.comb(n - 1, stages - 1) > limit:
        counts, _ = best_partition(costs, stages)
    else:
        prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))]).tolist()
        best_key, counts = None, None
        for cuts in itertools.combinations(range(1, n), stages - 1):
            bounds = (0,) + cuts + (n,)
            sums = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
            key = (round_robin_step(sums, devices, micro_batches), max(sums))
            if best_key is None or key < best_key:
                best_key, counts = key, [b - a for a, b in zip(bounds, bounds[1:])]
    starts = np.cumsum([0] + counts[:-1])
    sums = [float(sum(costs[a:a + c])) for a, c in zip(starts, counts)]
    return counts, max(sum(sums[d::devices]) for d in range(devices))


def _size(shape):
    return int(np.prod([d for d in shape[1:] if d is not None])) if len(shape) > 1 else 1


def op_flops(op, specs):
    """Forward multiply-adds x 2 per example of one op (``partition.Unit.ops``).

    Convolutions and dense layers exactly; any other layer with weights as
    2 x weights x positions (a transformer block's matmuls, attention scores
    left out); embeddings and weightless ops ~1 per output value.
    """
    import keras

    layer = op.layer
    own = getattr(layer, "flops_per_example", None)  # a block that counts itself (tfpar.models.vit.EncoderBlock)
    if callable(own):
        return int(own())
    outs = [specs[k] for k in op.outputs]
    outputs = sum(_size(t.shape) for t in outs)
    first_in = specs[op.inputs[0]] if op.inputs else None
    if isinstance(layer, keras.layers.Conv2D) and first_in is not None:
        kh, kw = layer.kernel_size
        return 2 * outputs * kh * kw * (first_in.shape[-1] // layer.groups)
    if isinstance(layer, keras.layers.Dense) and first_in is not None:
        return 2 * outputs * first_in.shape[-1]
    if getattr(layer, "weights", None) and not isinstance(layer, keras.layers.Embedding) and outs:
        positions = int(np.prod([d for d in outs[0].shape[1:-1] if d is not None])) if len(outs[0].shape) > 2 else 1
        return 2 * layer_params(layer) * positions
    return outputs


def layer_params(layer):
    return int(sum(np.prod(w.shape) for w in getattr(layer, "weights", ())))


def unit_costs(unit_list, kind):
    """Per-unit cost for ``kind`` in ``("flops", "params", "layers")``."""
    if kind == "flops":
        return [sum(op_flops(op, u.graph.specs) for op in u.ops) for u in unit_list]
    if kind == "params":
        return [sum(layer_params(l) for l in u.layers) for u in unit_list]
    return [sum(1 for l in u.layers if getattr(l, "weights", None)) or 0.0 for u in unit_list]


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
        specs = [unit.graph.specs[k] for k in unit.input]
        for spec in specs:
            if None in tuple(spec.shape)[1:]:
                raise ValueError(f"balance='time' needs fixed input shapes, but a tensor entering "
                                 f"{unit.names[0]!r} has shape {tuple(spec.shape)}; give the model's keras.Input "
                                 f"a fixed size (e.g. the sequence length) or use balance='flops'.")

        @tf.function
        def forward_backward(xs):
            floats = [x for x in xs if x.dtype.is_floating]
            with tf.GradientTape() as tape:
                tape.watch(floats)
                ys = segment(xs, training=True)
                loss = tf.add_n([tf.reduce_sum(tf.cast(y, tf.float32)) for y in ys if y.dtype.is_floating])
            return tape.gradient(loss, floats + list(weights))

        with tf.device(device):
            xs = tuple(partition.graph_lib.example(spec, micro_batch) for spec in specs)
            forward_backward(xs)  # trace and warm up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = forward_backward(xs)
                [o.numpy() for o in out if o is not None and not isinstance(o, tf.IndexedSlices)]
                times.append(time.perf_counter() - start)
        for v, value in zip(segment.non_trainable_variables, saved):
            v.assign(value)
        result.append(1000 * float(np.median(times)))
    return result


def cut_bytes(unit, dtype_bytes=None):
    """Bytes per example of every tensor crossing the cut after ``unit`` (``None`` if a size is unknown)."""
    total = 0
    for k in unit.output:
        spec = unit.graph.specs[k]
        if None in tuple(spec.shape)[1:]:
            return None
        width = np.dtype(_np_dtype(spec.dtype)).itemsize
        total += _size(spec.shape) * (dtype_bytes if dtype_bytes and "float" in str(spec.dtype) else width)
    return total


def table(unit_list, counts, devices, dtype_bytes=None, times=None):
    """The stage table: one dict per stage (device, layers, params, flops per image, ms, cut bytes per image)."""
    rows, start = [], 0
    for s, count in enumerate(counts):
        chunk = unit_list[start:start + count]
        layers = [l for u in chunk for l in u.layers]
        names = [n for u in chunk for n in u.names]
        crossing = cut_bytes(chunk[-1], dtype_bytes) if s < len(counts) - 1 else None
        rows.append({
            "stage": s, "device": devices[s], "first_layer": names[0], "last_layer": names[-1],
            "layers": len(layers), "params": sum(layer_params(l) for l in {id(l): l for l in layers}.values()),
            "flops_per_image": sum(op_flops(op, u.graph.specs) for u in chunk for op in u.ops),
            "cut_tensors": len(chunk[-1].output) if s < len(counts) - 1 else 0,
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
        cut = "-" if r["stage"] == len(rows) - 1 else "?" if r["cut_bytes_per_image"] is None else \
            f"{r['cut_bytes_per_image'] / 1024:.1f}" + (f" ({r['cut_tensors']})" if r.get("cut_tensors", 1) > 1 else "")
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
