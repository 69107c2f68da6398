"""Pipeline schedules as orderings of forward and backward micro-batch tasks.

A task is ``(kind, stage, micro_batch)`` with kind ``"F"`` or ``"B"``. A
schedule gives each device its own task order (each stage, where a device
holds one); ``ticks`` merges the devices into clock ticks that respect the
data dependencies (F(s, m) after F(s-1, m); B(s, m) after F(s, m) and
B(s+1, m)). The stage executor builds the graph in tick order and chains
each device's tasks with control dependencies, so a device really runs its
tasks in the schedule's order.

- ``gpipe``: every forward, then every backward (Huang et al., 2019). A
  stage holds all M micro-batches' activations.
- ``1f1b``: PipeDream-Flush (Narayanan et al., 2021). Stage s runs
  S - s - 1 warm-up forwards, then alternates one forward and one
  backward, then drains. It holds at most S - s micro-batches'
  activations, never more than S.
- ``interleaved_1f1b``: Megatron-LM's interleaved 1F1B (Narayanan et al.,
  2021, section 2.2). The S = V x D stages sit on D devices round-robin
  (stage s on device s mod D), so each device holds V thin stages. Device
  d runs its forwards in groups of D micro-batches, stage by stage, and
  its backwards the same way with its stages in reverse; it warms up with
  S - d - 1 forwards (Megatron adds D - d - 1 more to hide communication,
  which a tick model does not need), then alternates, then drains. One
  order per device: the device, not the stage, is what runs one task at a
  time.

``ticks`` counts one tick per task, so a stage of the interleaved schedule
is a 1/V-size task. With equal stages and M a multiple of D, a device is
busy 2VM ticks of 2(VM + D - 1): the bubble is (D - 1) / (VM + D - 1)
(``bubble``), the 1F1B bubble with M made V times longer. Device d holds at
most S - d stage activations of 1/V the size, as much as 1F1B's device d
with whole-device stages; M not a multiple of D leaves a few more idle ticks
(``ticks`` counts them).
"""

NAMES = ("gpipe", "1f1b", "interleaved_1f1b")


class ScheduleError(ValueError):
    """A schedule asked for with stages, devices or micro-batches it cannot use."""


def check(name):
    if name not in NAMES:
        raise ValueError(f"Unknown pipeline schedule {name!r}; choose one of: {', '.join(NAMES)}.")
    return name


def check_shape(name, stages, devices, micro_batches):
    """One sentence (``ScheduleError``) when schedule ``name`` cannot run ``stages`` on ``devices`` over
    ``micro_batches``; returns V, the stages per device."""
    check(name)
    if name != "interleaved_1f1b":
        if devices != stages:
            raise ScheduleError(f"Schedule {name} puts one stage on each device, so it needs as many devices as "
                                f"stages ({stages}), got {devices}; use schedule='interleaved_1f1b' for several "
                                f"stages per device.")
        return 1
    if stages % devices:
        raise ScheduleError(f"Schedule interleaved_1f1b puts stages round-robin on the devices, so stages must be "
                            f"a multiple of the {devices} device(s), got stages={stages}.")
    if micro_batches < stages:
        raise ScheduleError(f"Schedule interleaved_1f1b needs at least as many micro-batches as stages: at least "
                            f"{stages} for {stages} stages, got micro_batches={micro_batches}.")
    return stages // devices


def device_of(stage, devices):
    """The device (0..devices-1) that holds ``stage``: round-robin, stage s on device s mod D."""
    return stage % devices


def gpipe(stages, micro_batches):
    """Per-stage task orders of GPipe: all forwards, then all backwards."""
    return [[("F", s, m) for m in range(micro_batches)] + [("B", s, m) for m in range(micro_batches)]
            for s in range(stages)]


def one_f_one_b(stages, micro_batches):
    """Per-stage task orders of 1F1B (PipeDream-Flush)."""
    orders = []
    for s in range(stages):
        warmup = min(stages - s - 1, micro_batches)
        order = [("F", s, m) for m in range(warmup)]
        for i in range(micro_batches - warmup):
            order += [("F", s, warmup + i), ("B", s, i)]
        order += [("B", s, m) for m in range(micro_batches - warmup, micro_batches)]
        orders.append(order)
    return orders


def interleaved(stages, micro_batches, devices):
    """Per-device task orders of interleaved 1F1B: ``stages`` = V x ``devices``, stage s on device s mod D."""
    V = stages // devices
    result = []
    for d in range(devices):
        forwards, backwards = [], []
        for first in range(0, micro_batches, devices):  # groups of D micro-batches
            group = range(first, min(first + devices, micro_batches))
            forwards += [("F", v * devices + d, m) for v in range(V) for m in group]
            backwards += [("B", v * devices + d, m) for v in reversed(range(V)) for m in group]
        total = len(forwards)
        warmup = min(stages - d - 1, total)
        order = forwards[:warmup]
        for i in range(total - warmup):
            order += [forwards[warmup + i], backwards[i]]
        result.append(order + backwards[total - warmup:])
    return result


def orders(name, stages, micro_batches, devices=None):
    """Task orders of schedule ``name``: one per device (``devices`` = D, default one device per stage).

    With one stage per device (GPipe, 1F1B) the orders are per stage.
    """
    check_shape(name, stages, devices or stages, micro_batches)
    if name == "interleaved_1f1b":
        return interleaved(stages, micro_batches, devices or stages)
    return {"gpipe": gpipe, "1f1b": one_f_one_b}[name](stages, micro_batches)


def _ready(task, done, stages):
    kind, s, m = task
    if kind == "F":
        return s == 0 or ("F", s - 1, m) in done
    return ("F", s, m) in done and (s == stages - 1 or ("B", s + 1, m) in done)


def ticks(per_device):
    """Merge per-device orders into clock ticks: each tick, every device whose next task is ready runs it.

    Returns a list of ticks, each a list of tasks. Raises ``ValueError`` if the
    orders deadlock (a schedule bug).
    """
    stages = 1 + max(task[1] for order in per_device for task in order)
    position, done, result = [0] * len(per_device), set(), []
    while any(p < len(o) for p, o in zip(position, per_device)):
        ready = [d for d, order in enumerate(per_device)
                 if position[d] < len(order) and _ready(order[position[d]], done, stages)]
        if not ready:
            raise ValueError("pipeline schedule deadlocks")
        tick = [per_device[d][position[d]] for d in ready]
        for d in ready:
            position[d] += 1
        done.update(tick)
        result.append(tick)
    return result


def held_theory(name, stages, micro_batches, devices=None):
    """Per device, the most stage activations (one stage, one micro-batch) schedule ``name`` holds at once.

    GPipe holds M per stage, 1F1B min(S - s, M), interleaved 1F1B min(S - d, V x M) on device d.
    """
    if name == "gpipe":
        return [micro_batches] * stages
    D = devices or stages
    return [min(stages - d, micro_batches * (stages // D)) for d in range(D)]


def in_flight(per_stage):
    """Per order (stage or device), the most stage activations held at once (forward done, backward not)."""
    peaks = []
    for order in per_stage:
        held = peak = 0
        for kind, _, _ in order:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def bubble(stages, micro_batches, devices=None):
    """The idle fraction of a synchronous pipeline with equal stages on D devices (default D = S).

    (D - 1) / (V M + D - 1) with V = S / D stages per device: (S - 1) / (M + S - 1) for GPipe and 1F1B.
    """
    D = devices or stages
    return (D - 1) / (micro_batches * (stages // D) + D - 1)
