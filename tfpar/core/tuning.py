"""Choosing step settings by timing: the search order and the pick, with no clock and no TensorFlow.

tfpar's ``auto`` rules (XLA off on CPUs, 25 MiB buckets, float32 sums, one
micro-batch) misfire across models: on one 2-core CPU XLA lost 3.5x on
ResNet-50 and won 1.34x on a small transformer. So ``--autotune`` measures.
Timing every combination would cost too much of a run, so the search is
pruned, one group of settings at a time in ``GROUPS``: the precision policy
first, when the user allowed more than one (it changes everything else's
cost); then XLA and micro-batches together, every pair, because they
interact: XLA compiles the whole accumulated step, so whether it pays can
depend on the micro-batch count. On a 2-core Xeon a small keras-hub Gemma
measured XLA on with 4 micro-batches fastest of the six pairs, and XLA at
one micro-batch no faster than without, in one sweep; the search that fixed
XLA at one micro-batch first could not reach that pair. Then the bucket
size given those choices, then the all-reduce dtype. Each group keeps its
fastest candidate and the next group is timed on top of it.

A short trial is noisy: on a 2-core CPU one trial of a setting differs from
the next by up to 20%, so a pick between two settings that close is a coin
toss. When the runner-up is within ``RUNOFF_MARGIN`` of the choice, both are
timed once more, in the reverse order (A B, then B A, so a machine that
speeds up or slows down during the search moves both alike), and the lower
mean of each setting's times wins. Nothing else is timed twice.

``search(space, trial, start)`` runs that order with any ``trial`` function
(the real one times steps; tests pass a fake clock), within a budget of
trials, and returns a ``Result``: the choice, the trials in the order they
ran, and whether the budget cut the search short.
"""

import dataclasses
import itertools

# The order settings are tuned in; earlier choices are fixed while later ones are timed.
ORDER = ("precision", "xla", "micro_batches", "bucket_mb", "all_reduce_dtype")
# Settings timed together (every combination) because one changes what the other costs.
GROUPS = (("precision",), ("xla", "micro_batches"), ("bucket_mb",), ("all_reduce_dtype",))
RUNOFF_MARGIN = 0.2  # a runner-up this close (step time within 20% of the choice's) is timed again
LABELS = {"precision": "precision", "xla": "XLA", "bucket_mb": "bucket MiB", "all_reduce_dtype": "all-reduce",
          "micro_batches": "micro-batches"}


class NothingToTune(ValueError):
    """``--autotune`` was asked for but every setting is fixed; the message says which are."""


@dataclasses.dataclass
class Trial:
    """One timed setting: the full setting and its median step time in seconds."""

    setting: dict
    step_sec: float
    changed: str = ""  # the setting(s) this trial varied, "+"-joined ("" for the start, "again" for a runoff)


@dataclasses.dataclass
class Result:
    choice: dict
    trials: list
    cut_short: bool = False  # the budget ended the search before every candidate was timed

    def best(self):
        """The chosen setting's trial with its mean step time over every time it was timed."""
        times = [t.step_sec for t in self.trials if t.setting == self.choice]
        return Trial(dict(self.choice), sum(times) / len(times))

    def as_dict(self):
        return {"choice": dict(self.choice), "cut_short": self.cut_short,
                "trials": [{"setting": dict(t.setting), "step_ms": round(t.step_sec * 1000, 3),
                            "changed": t.changed} for t in self.trials]}


def fastest(trials):
    """The trial with the smallest step time; ties keep the earlier one (the starting point wins a tie)."""
    if not trials:
        raise ValueError("No trials to choose from.")
    return min(enumerate(trials), key=lambda it: (it[1].step_sec, it[0]))[1]


def tuned(space):
    """The settings of ``space`` with more than one candidate, in search order."""
    return [name for name in ORDER if len(space.get(name, ())) > 1]


def _candidates(space, group, current):
    """Every combination of ``group``'s tuned settings on top of ``current``, in order: the first setting
    of the group varies fastest, so a budget that cuts the search short has tried XLA before micro-batches."""
    names = [name for name in group if len(space.get(name, ())) > 1]
    combos = itertools.product(*(space[name] for name in reversed(names)))
    return names, [{**current, **dict(zip(reversed(names), combo))} for combo in combos]


def count(space):
    """How many trials the search runs for ``space`` before a runoff (which adds 2): the start, then each
    other combination of a group once."""
    total = 1
    for group in GROUPS:
        names, candidates = _candidates(space, group, {})
        total += len(candidates) - 1 if names else 0
    return total


def search(space, trial, start=None, max_trials=None):
    """Time ``space``'s candidates group by group (``GROUPS``) and keep the fastest of each group.

    Args:
      space: setting name -> candidates (first: the value ``auto`` would pick
        without timing). Settings with one candidate are fixed.
      trial: ``setting dict -> step seconds``.
      start: the setting to time first (default: every first candidate).
      max_trials: stop after this many trials (the budget); the best so far wins.

    Returns:
      A ``Result``. A runoff (see the module docstring) adds two trials marked ``again`` when the budget
      allows them.

    Raises:
      NothingToTune: no setting of ``space`` has more than one candidate.
    """
    if not tuned(space):
        raise NothingToTune("Nothing to tune: every setting has one candidate.")
    current = dict(start) if start is not None else {name: values[0] for name, values in space.items()}
    trials = [Trial(dict(current), float(trial(dict(current))))]
    cut = False
    for group in GROUPS:
        names, candidates = _candidates(space, group, current)
        if not names:
            continue
        timed = [next(t for t in trials if t.setting == current)]
        for setting in candidates:
            if setting == current:
                continue
            if max_trials is not None and len(trials) >= max_trials:
                cut = True
                break
            changed = "+".join(name for name in names if setting[name] != current[name])
            trials.append(Trial(setting, float(trial(dict(setting))), changed))
            timed.append(trials[-1])
        current = dict(fastest(timed).setting)
        if cut:
            break
    if not cut and (max_trials is None or len(trials) + 2 <= max_trials):
        current = _runoff(trials, current, trial)
    return Result(current, trials, cut)


def _runoff(trials, choice, trial):
    """Time ``choice`` and its runner-up again when they are within ``RUNOFF_MARGIN``; the lower mean wins.

    The runner-up is timed first, so over both rounds each setting was timed once earlier and once later.
    """
    mine = next(t for t in trials if t.setting == choice)
    others = [t for t in trials if t.setting != choice]
    if not others:
        return choice
    second = fastest(others)
    if second.step_sec > mine.step_sec * (1 + RUNOFF_MARGIN):
        return choice
    for setting in (second.setting, choice):
        trials.append(Trial(dict(setting), float(trial(dict(setting))), "again"))

    def mean(setting):
        times = [t.step_sec for t in trials if t.setting == setting]
        return sum(times) / len(times)

    return dict(second.setting) if mean(second.setting) < mean(choice) else dict(choice)


def table(result, names=None, units="ms"):
    """The trials as text lines: one per trial (``names``: the columns, default all), the chosen one marked."""
    if not result.trials:
        return []
    names = list(names or result.trials[0].setting)
    head = ["  ".join(f"{LABELS.get(n, n):>13}" for n in names) + f"  {'step ' + units:>10}"]
    rows, marked = [], False
    for t in result.trials:
        mark = "  <- chosen" if t.setting == result.choice and not marked else ""
        marked = marked or bool(mark)
        mark += "  (timed again)" if t.changed == "again" else ""
        cells = "  ".join(f"{show(t.setting[n]):>13}" for n in names)
        rows.append(f"{cells}  {t.step_sec * 1000:10.1f}{mark}")
    return head + rows


def show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
