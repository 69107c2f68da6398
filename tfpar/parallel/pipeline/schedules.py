"""Pipeline schedules as orderings of forward and backward micro-batch tasks.

A task is ``(kind, stage, micro_batch)`` with kind ``"F"`` or ``"B"``. A
schedule gives each stage its own task order; ``ticks`` merges the stages
into clock ticks that respect the data dependencies (F(s, m) after
F(s-1, m); B(s, m) after F(s, m) and B(s+1, m)). The stage executor
builds the graph in tick order and chains each stage's tasks with control
dependencies, so a stage really runs its tasks in the schedule's order.

- ``gpipe``: every forward, then every backward (Huang et al., 2019). A
  stage holds all M micro-batches' activations.
- ``1f1b``: PipeDream-Flush (Narayanan et al., 2021). Stage s runs
  S - s - 1 warm-up forwards, then alternates one forward and one
  backward, then drains. It holds at most S - s micro-batches'
  activations, never more than S.
"""

NAMES = ("gpipe", "1f1b")


def check(name):
    if name not in NAMES:
        raise ValueError(f"Unknown pipeline schedule {name!r}; choose one of: {', '.join(NAMES)}.")
    return name


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


def orders(name, stages, micro_batches):
    """Per-stage task orders of schedule ``name``."""
    return {"gpipe": gpipe, "1f1b": one_f_one_b}[check(name)](stages, micro_batches)


def _ready(task, done, stages):
    kind, s, m = task
    if kind == "F":
        return s == 0 or ("F", s - 1, m) in done
    return ("F", s, m) in done and (s == stages - 1 or ("B", s + 1, m) in done)


def ticks(per_stage):
    """Merge per-stage orders into clock ticks: each tick, every stage whose next task is ready runs it.

    Returns a list of ticks, each a list of tasks. Raises ``ValueError`` if the
    orders deadlock (a schedule bug).
    """
    stages = len(per_stage)
    position, done, result = [0] * stages, set(), []
    while any(p < len(o) for p, o in zip(position, per_stage)):
        tick = [per_stage[s][position[s]] for s in range(stages)
                if position[s] < len(per_stage[s]) and _ready(per_stage[s][position[s]], done, stages)]
        if not tick:
            raise ValueError("pipeline schedule deadlocks")
        for task in tick:
            position[task[1]] += 1
        done.update(tick)
        result.append(tick)
    return result


def in_flight(per_stage):
    """Per stage, the most micro-batches whose activations are held at once (forward done, backward not)."""
    peaks = []
    for order in per_stage:
        held = peak = 0
        for kind, _, _ in order:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


def bubble(stages, micro_batches):
    """The idle fraction of a synchronous pipeline with equal stages: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)
