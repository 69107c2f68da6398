"""Where a training step's time goes, read from a TensorBoard profiler trace.

``tfpar-train --profile_steps=A,B`` (Keras's TensorBoard callback) writes
``.xplane.pb`` files. TensorBoard's profile tab shows them one by one; this
module boils one down to a few numbers per step, so that a benchmark can say
*why* a configuration is slow:

* ``step_ms``: wall time of one training-step call on the Python main thread;
* ``compute_ms``: time at least one TF op ran on a compute thread;
* ``all_reduce_ms``: time the collective executor threads (multi-worker
  all-reduce over gRPC) were busy;
* ``overlap_ms``: both at once; ``exposed_ms``: the step minus compute, time
  the step waited on something other than its own ops (all-reduce, input).

  python -m tfpar.core.trace runs/resnet50          # every trace under a model_dir
"""

import collections
import os
import sys

STEP_EVENTS = ("multi_step_on_iterator", "one_step_on_iterator", "train_function")  # Keras 3, then tf_keras


def _merge(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(intervals):
    return sum(end - start for start, end in intervals)


def _intersection(a, b):
    """Total length of two merged interval lists' overlap."""
    i = j = total = 0
    while i < len(a) and j < len(b):
        total += max(0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def find(model_dir):
    """Every ``.xplane.pb`` under ``model_dir``, sorted (chief's ``train/`` before ``workers/``)."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(model_dir)
                  for name in names if name.endswith(".xplane.pb"))


def host_plane(path):
    """The ``/host:CPU`` plane of an ``.xplane.pb`` file (every op TF ran on the host)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    host = next((p for p in space.planes if p.name == "/host:CPU"), None)
    if host is None:
        raise ValueError(f"{path} holds no /host:CPU trace.")
    return host


def step_breakdown(path, top=8):
    """Per-step averages of one trace (``.xplane.pb``) of training steps; see the module docstring.

    Returns a dict with ``steps``, the ``*_ms`` numbers, ``busy_ms_by_thread``
    (thread-pool name -> busy ms per step) and ``top_ops`` ([op type, ms per step]).

    Raises:
      ValueError: the file holds no host trace or no training step.
    """
    host = host_plane(path)
    names = host.event_metadata
    steps, busy, op_time = [], collections.defaultdict(list), collections.Counter()
    for line in host.lines:
        pool = line.name.split("/")[0]  # "tf_Compute/<id>" -> "tf_Compute"
        events = [(names[e.metadata_id].name, line.timestamp_ns * 1000 + e.offset_ps, e.duration_ps) for e in line.events]
        step_spans = [(start, start + length) for name, start, length in events if name in STEP_EVENTS]
        if step_spans:  # the Python main thread, named after the program ("python", "tfpar-train", ...)
            steps.extend(step_spans)
            continue
        for name, start, length in events:
            if length == 0 or name.startswith("ThreadpoolListener"):
                continue
            busy[pool].append((start, start + length))
            if pool == "tf_Compute" and ":" in name and not name.startswith("Executor"):
                op_time[name.rsplit(":", 1)[1]] += length  # "scope/op:OpType"
    steps = _merge(steps)
    if not steps:
        raise ValueError(f"{path} holds no training step ({' or '.join(STEP_EVENTS)}).")
    n = len(steps)

    def in_steps(intervals):
        return _merge([[max(s, a), min(e, b)] for s, e in _merge(intervals) for a, b in steps if min(e, b) > max(s, a)])

    per_pool = {pool: in_steps(spans) for pool, spans in busy.items()}
    compute = per_pool.get("tf_Compute", [])
    collective = _merge([span for pool, spans in per_pool.items() if pool.startswith("collective") for span in spans])
    ms = lambda ps: round(ps / n / 1e9, 1)  # noqa: E731  picoseconds in all steps -> ms per step
    return {
        "steps": n,
        "step_ms": ms(_length(steps)),
        "compute_ms": ms(_length(compute)),
        "all_reduce_ms": ms(_length(collective)),
        "overlap_ms": ms(_intersection(compute, collective)),
        "exposed_ms": ms(_length(steps) - _length(compute)),
        "busy_ms_by_thread": {pool: ms(_length(spans)) for pool, spans in sorted(per_pool.items())},
        "top_ops": [[op, ms(ps)] for op, ps in op_time.most_common(top)],
    }


def describe(breakdown):
    """One line for a breakdown."""
    b = breakdown
    return (f"{b['steps']} steps: {b['step_ms']:.0f} ms/step = compute {b['compute_ms']:.0f} + exposed "
            f"{b['exposed_ms']:.0f} (all-reduce busy {b['all_reduce_ms']:.0f}, overlapping compute "
            f"{b['overlap_ms']:.0f}); top ops: " + ", ".join(f"{op} {t:.0f}" for op, t in b["top_ops"][:4]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m tfpar.core.trace MODEL_DIR_OR_XPLANE_PB\n\n" + __doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    paths = [argv[0]] if argv[0].endswith(".xplane.pb") else find(argv[0])
    if not paths:
        print(f"tfpar.core.trace: error: no .xplane.pb under {argv[0]}; train with --profile_steps=A,B first.",
              file=sys.stderr)
        return 2
    for path in paths:
        try:
            print(f"{path}\n  {describe(step_breakdown(path))}")
        except ValueError as err:
            print(f"tfpar.core.trace: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
