"""A pipeline's timeline and bubble, read from a TensorBoard profiler trace.

The stage executor names every task's ops ``stage<s>_F<m>/...`` (forward)
or ``stage<s>_B<m>/...``, and TF names the gradient ops of a forward op
``gradient_tape/stage<s>_F<m>/...``: so each op event in the trace says
which stage, task and micro-batch it belongs to. A stage's busy time is the
union of its ops' intervals within the traced steps; the bubble is the
share of the step a stage is idle, averaged over stages (over devices when
interleaved 1F1B puts several stages on one). On logical CPUs the stages
share one thread pool, so rows are stages, not threads.
"""

import collections
import logging
import os
import re

log = logging.getLogger("tfpar")
# Bookkeeping ops with no data inputs run as soon as the step starts; they would stretch a task's box.
_IGNORED = {"ReadVariableOp", "Identity", "NoOp", "Const", "_Send", "_Recv", "Shape", "VarHandleOp"}
_TASK = re.compile(r"(?:^|/)(gradient_tape/)?(?:copy(\d+)_)?stage(\d+)_([FB])(\d+)(?:_\d+)?/")


def _events(path):
    from tfpar.core import trace

    host = trace.host_plane(path)
    names, steps, ops = host.event_metadata, [], []
    for line in host.lines:
        for e in line.events:
            name, start = names[e.metadata_id].name, line.timestamp_ns * 1000 + e.offset_ps
            if name in trace.STEP_EVENTS:
                steps.append((start, start + e.duration_ps))
            elif e.duration_ps and name.rsplit(":", 1)[-1] not in _IGNORED:
                match = _TASK.search(name)
                if match:
                    grad, copy, stage, kind, micro = match.groups()
                    ops.append((int(copy or 0), int(stage), "B" if grad else kind, int(micro),
                                start, start + e.duration_ps))
    return trace._merge(steps), ops


def read(path, other_tasks=(), devices=None):
    """``{"steps", "step_ms", "busy_ms" (per stage), "bubble", "tasks"}`` from one ``.xplane.pb``.

    ``tasks`` lists, for the first traced step, ``[stage, kind, micro, start_ms, end_ms]`` relative to
    the step's start (copy 0 only). ``other_tasks``: traces of the stage tasks of a cluster, taken at
    the same time (``tasks.trace_stages``); their ops join the chief's, whose trace marks the steps.
    ``devices``: D when interleaved 1F1B puts stage s on device s mod D; busy and idle time are then
    per device (``copy<r>/device<d>``, the union of its stages' ops) and the result says ``devices``.
    """
    from tfpar.core import trace

    steps, ops = _events(path)
    for other in other_tasks:
        ops += _events(other)[1]
    if not steps or not ops:
        raise ValueError(f"{path} holds no pipeline step (no stage<s>_F<m> ops inside a train step).")
    by_stage = collections.defaultdict(list)
    for copy, stage, _, _, start, end in ops:
        row = (copy, stage) if devices is None else (copy, stage % devices)
        for a, b in steps:
            if min(end, b) > max(start, a):
                by_stage[row].append([max(start, a), min(end, b)])
    step_ps = trace._length(steps)
    busy = {key: trace._length(trace._merge(spans)) for key, spans in by_stage.items()}
    first = steps[0]
    boxes = collections.defaultdict(lambda: [float("inf"), 0])
    for copy, stage, kind, micro, start, end in ops:
        if copy == 0 and first[0] <= start < first[1]:
            box = boxes[(stage, kind, micro)]
            box[0], box[1] = min(box[0], start), max(box[1], end)
    to_ms = lambda ps: ps / 1e9  # noqa: E731
    row = "stage" if devices is None else "device"
    return {
        "steps": len(steps),
        "step_ms": round(to_ms(step_ps) / len(steps), 2),
        "busy_ms": {f"copy{c}/{row}{s}": round(to_ms(v) / len(steps), 2) for (c, s), v in sorted(busy.items())},
        "idle_ms": {f"copy{c}/{row}{s}": round(to_ms(step_ps - v) / len(steps), 2) for (c, s), v in sorted(busy.items())},
        "bubble": round(1 - sum(busy.values()) / (len(busy) * step_ps), 4),
        "tasks": sorted([s, k, m, round(to_ms(a - first[0]), 3), round(to_ms(b - first[0]), 3)]
                        for (s, k, m), (a, b) in boxes.items()),
        **({"devices": devices} if devices is not None else {}),
    }


def read_run(model_dir, devices=None):
    """The timeline of a run's traced steps, or ``None`` when ``model_dir`` holds no pipeline trace.

    The chief's traces anywhere under ``model_dir``, joined with the stage tasks' traces that
    ``tasks.StageTrace`` wrote under ``model_dir/stage_traces``; ``devices`` as for ``read``.
    """
    from tfpar.core import trace
    from tfpar.parallel.pipeline import tasks

    remote = trace.find(os.path.join(model_dir, tasks.STAGE_TRACES))
    measured = None
    for path in trace.find(model_dir):
        if path in remote:
            continue
        try:
            measured = read(path, other_tasks=remote, devices=devices)
        except ValueError as err:
            log.info("no pipeline timeline in %s: %s", path, err)
    return measured


def plot(timelines, path, titles=None):
    """A PNG of one or more timelines side by side: stages as rows, micro-batches as boxes (F light, B dark).

    A timeline with ``devices`` (interleaved 1F1B) has a row per device and colours its boxes by stage,
    each labelled with its stage and micro-batch.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(timelines), figsize=(6.5 * len(timelines), 2.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, timeline, title in zip(axes[0], timelines, titles or [None] * len(timelines)):
        per_device = timeline.get("devices")
        rows = per_device or 1 + max(t[0] for t in timeline["tasks"])
        for stage, kind, micro, start, end in timeline["tasks"]:
            row = stage if per_device is None else stage % per_device
            colour, label = (colours(micro % 10), f"{kind}{micro}") if per_device is None else \
                (colours(stage % 10), f"{kind}{micro}\ns{stage}")
            ax.barh(row, end - start, left=start, height=0.8, color=colour,
                    alpha=0.45 if kind == "F" else 0.95, edgecolor="black", linewidth=0.4)
            ax.text((start + end) / 2, row, label, ha="center", va="center", fontsize=6 if per_device else 7)
        ax.set_yticks(range(rows), [f"{'device' if per_device else 'stage'} {s}" for s in range(rows)])
        ax.invert_yaxis()
        ax.set_xlabel("ms into the step")
        ax.set_title(f"{title or ''} (bubble {timeline['bubble']:.0%})".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
