"""Which weights are split how, and the parameter memory each device holds.

``plan`` needs no devices: it builds the model inside ``keras.StatelessScope``
(variables get shapes but no memory) and applies the rules to the shapes, so
the table for full-size VGG16 costs nothing.
"""

import numpy as np

from tfpar.parallel.sharding import rules as rules_lib


def plan(model_builder, rules, mesh_shape):
    """One row per model weight: path, shape, spec, per-device shape and bytes."""
    import keras

    with keras.StatelessScope():
        model = model_builder()
    rows = []
    for w in model.weights:
        shape = tuple(int(d) for d in w.shape)
        spec, note = rules_lib.resolve_noted(rules, w.path, shape, mesh_shape)
        rows.append(_row(w.path, shape, spec, w.dtype, mesh_shape, note))
    return rows


def from_layouts(model, layouts):
    """The same rows for a model built in ``layout_scope`` (its real layouts)."""
    return [_row(w.path, tuple(int(d) for d in w.shape), layouts.specs[w.path], w.dtype, layouts.mesh_shape,
                 layouts.notes.get(w.path)) for w in model.weights]


def _row(path, shape, spec, dtype, mesh_shape, note=None):
    itemsize = np.dtype(str(dtype)).itemsize
    local = rules_lib.shard_shape(shape, spec, mesh_shape)
    return {
        "path": path, "shape": shape, "spec": spec, "device_shape": local,
        "bytes": int(np.prod(shape)) * itemsize, "device_bytes": int(np.prod(local)) * itemsize, "note": note,
    }


def adaptations(rows):
    """Lines saying how default rules were adapted to the mesh (weights left whole and why)."""
    by_note = {}
    for r in rows:
        if r.get("note"):
            by_note.setdefault(r["note"], []).append(r["path"])
    lines = []
    for note, paths in by_note.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        lines.append(f"Default layout rules on this mesh: {shown} {note}.")
    return lines


def totals(rows):
    """``{"param_bytes": ..., "param_bytes_per_device": ...}`` over ``rows``."""
    return {"param_bytes": sum(r["bytes"] for r in rows), "param_bytes_per_device": sum(r["device_bytes"] for r in rows)}


def _spec_text(spec):
    return "replicated" if not any(spec) else "[" + ", ".join(a or "·" for a in spec) + "]"


def markdown(rows, mesh_shape, skip_replicated_below=0):
    """A markdown table of ``rows`` and a memory line; small replicated weights can be folded."""
    mesh_text = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
    lines = [f"| weight | shape | split over `{mesh_text}` | per-device shape | MiB per device |",
             "|---|---|---|---|---:|"]
    folded = []
    for r in rows:
        if not any(r["spec"]) and r["bytes"] < skip_replicated_below:
            folded.append(r)
            continue
        lines.append(f"| `{r['path']}` | {list(r['shape'])} | {_spec_text(r['spec'])} | {list(r['device_shape'])} | "
                     f"{r['device_bytes'] / 2**20:.2f} |")
    if folded:
        size = sum(r["device_bytes"] for r in folded)
        lines.append(f"| {len(folded)} small weights (biases) | | replicated | | {size / 2**20:.2f} |")
    t = totals(rows)
    lines.append("")
    lines.append(f"Parameters: {t['param_bytes'] / 2**20:.1f} MiB in all, {t['param_bytes_per_device'] / 2**20:.1f} MiB "
                 f"per device ({t['param_bytes_per_device'] / t['param_bytes']:.0%}); optimizer slots follow the same "
                 f"layouts (SGD momentum: one more copy, Adam: two).")
    return "\n".join(lines)
