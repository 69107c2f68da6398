"""tfpar.core.tuning and tfpar.core.tuning_cache: the pick from a fake clock, the pruned order, the cache.

No timing here: every step time comes from a table, so each assertion is exact.
"""

import json
import os

import pytest

from tfpar.core import tuning, tuning_cache

VERSIONS = {"tfpar": "0.1.0", "tensorflow": "2.21.0", "keras": "3.15.1"}


def clock(times):
    """A fake trial: the step seconds of a setting from ``times`` (keyed by the changed values), and a log."""
    calls = []

    def trial(setting):
        calls.append(dict(setting))
        return times(setting)

    return trial, calls


def test_the_fastest_setting_is_chosen_in_the_pruned_order():
    space = {"xla": [False, True], "bucket_mb": [25.0, 0.0, 5.0], "all_reduce_dtype": ["float32", "bfloat16"],
             "micro_batches": [1, 2]}

    def times(s):  # XLA wins; 2 micro-batches win; given both, 5 MiB buckets win; bfloat16 loses
        return ((1.0 if s["xla"] else 2.0) + {25.0: 0.0, 0.0: 0.05, 5.0: -0.1}[s["bucket_mb"]]
                + (0.2 if s["all_reduce_dtype"] == "bfloat16" else 0.0) - (0.01 if s["micro_batches"] == 2 else 0))

    trial, calls = clock(times)
    result = tuning.search(space, trial)
    assert result.choice == {"xla": True, "bucket_mb": 5.0, "all_reduce_dtype": "float32", "micro_batches": 2}
    # the start once; XLA x micro-batches every pair; then each other candidate once
    assert tuning.count(space) == 1 + 3 + 2 + 1
    assert [t.changed for t in result.trials] == ["", "xla", "micro_batches", "xla+micro_batches", "bucket_mb",
                                                  "bucket_mb", "all_reduce_dtype", "again", "again"]
    # buckets were timed with XLA and 2 micro-batches already chosen: the search is pruned, not exhaustive
    assert all(c["xla"] and c["micro_batches"] == 2 for c in calls[4:])
    # the runner-up (25 MiB buckets, 0.99 s) is within 20% of the choice (0.89 s): both timed again, it first
    assert calls[7] == {**result.choice, "bucket_mb": 25.0} and calls[8] == result.choice
    assert result.best().setting == result.choice and not result.cut_short
    # the chosen row is marked once in the table, the runoff's rows say so
    lines = tuning.table(result)
    assert len(lines) == 1 + len(calls) and sum("<- chosen" in line for line in lines) == 1
    assert sum("(timed again)" in line for line in lines) == 2


def test_a_runoff_of_the_two_closest_settings_decides_by_their_mean_times():
    # A's first trial was lucky (0.90 against B's 1.00); timed again in the order B, A, B wins on the mean.
    times = {False: iter([1.00, 1.10]), True: iter([0.90, 1.25])}
    trial, calls = clock(lambda s: next(times[s["xla"]]))
    result = tuning.search({"xla": [False, True]}, trial)
    assert [c["xla"] for c in calls] == [False, True, False, True]
    assert result.choice == {"xla": False} and result.best().step_sec == pytest.approx(1.05)
    # a runner-up further than RUNOFF_MARGIN away is not timed again, and a budget without room skips the runoff
    trial, calls = clock(lambda s: 1.0 if s["xla"] else 1.0 * (1 + tuning.RUNOFF_MARGIN) + 0.01)
    assert tuning.search({"xla": [False, True]}, trial).choice == {"xla": True} and len(calls) == 2
    trial, calls = clock(lambda s: 1.0)
    assert not tuning.search({"xla": [False, True]}, trial, max_trials=3).cut_short and len(calls) == 2


def test_xla_and_micro_batches_are_timed_together_because_they_interact():
    # As measured for a small Gemma on one CPU: XLA alone no faster, micro-batches alone slower, both together fastest.
    table = {(False, 1): 1.00, (True, 1): 1.02, (False, 2): 1.05, (True, 2): 0.97, (False, 4): 1.10, (True, 4): 0.83}
    trial, calls = clock(lambda s: table[(s["xla"], s["micro_batches"])])
    result = tuning.search({"xla": [False, True], "micro_batches": [1, 2, 4]}, trial)
    assert result.choice == {"xla": True, "micro_batches": 4}
    assert len({(c["xla"], c["micro_batches"]) for c in calls[:len(table)]}) == len(table)
    assert calls[len(table):] == [{"xla": True, "micro_batches": 2}, result.choice]  # the runner-up within 20%
    assert calls[1] == {"xla": True, "micro_batches": 1}  # XLA flipped first: a short budget still tries it


def test_a_tie_keeps_the_starting_point_and_fixed_settings_are_never_timed():
    trial, calls = clock(lambda s: 1.0)
    result = tuning.search({"xla": [False, True], "precision": ["float32"], "micro_batches": [1]}, trial)
    assert result.choice == {"xla": False, "precision": "float32", "micro_batches": 1}
    # a tie is within the runoff margin: both are timed again, and the start still wins the tie
    assert len(calls) == 4 and {c["precision"] for c in calls} == {"float32"}


def test_precision_is_tuned_first_and_only_among_the_allowed():
    space = {"precision": ["float32", "mixed_bfloat16"], "xla": [False, True]}
    trial, calls = clock(lambda s: (1.0 if s["precision"] == "mixed_bfloat16" else 2.0) + (0.0 if s["xla"] else 1.0))
    result = tuning.search(space, trial)
    assert result.choice == {"precision": "mixed_bfloat16", "xla": True}
    assert {c["precision"] for c in calls} <= {"float32", "mixed_bfloat16"}
    assert calls[1] == {"precision": "mixed_bfloat16", "xla": False}  # precision before XLA


def test_the_budget_cuts_the_search_and_keeps_the_best_so_far():
    space = {"xla": [False, True], "bucket_mb": [25.0, 0.0, 5.0]}
    trial, calls = clock(lambda s: 1.0 if s["xla"] else 2.0)
    result = tuning.search(space, trial, max_trials=3)
    assert len(calls) == 3 and result.cut_short and result.choice["xla"] is True


def test_nothing_to_tune_is_one_sentence():
    with pytest.raises(tuning.NothingToTune, match="every setting has one candidate"):
        tuning.search({"xla": [True]}, lambda s: 1.0)


SHAPE = {"model": "abc", "devices": "CPU x2", "replicas": 2, "space": {"xla": [False, True]}}
RESULT = {"choice": {"xla": True}, "trials": [], "cut_short": False}


def test_cache_is_used_and_invalidated_by_model_devices_and_versions(tmp_path):
    env = {tuning_cache.ENV: str(tmp_path)}
    assert tuning_cache.load(SHAPE, VERSIONS, env) is None
    path = tuning_cache.store(SHAPE, VERSIONS, RESULT, env)
    assert path.startswith(str(tmp_path)) and json.load(open(path))["versions"] == VERSIONS
    assert tuning_cache.load(dict(SHAPE), VERSIONS, env)["choice"] == {"xla": True}
    for change in ({"model": "abd"}, {"devices": "GPU x2"}, {"replicas": 4}):
        assert tuning_cache.load({**SHAPE, **change}, VERSIONS, env) is None, change
    with pytest.raises(tuning_cache.Stale, match=r"written by tfpar 0\.1\.0, tensorflow 2\.21\.0, keras 3\.15\.1, "
                                                 r"not tfpar 0\.1\.0, tensorflow 2\.22\.0, keras 3\.15\.1; re-tuning"):
        tuning_cache.load(SHAPE, {**VERSIONS, "tensorflow": "2.22.0"}, env)
    # jit_compile=auto finds it by model and devices only, and only for these versions
    match = lambda s: s.get("model") == "abc"  # noqa: E731
    assert tuning_cache.find(match, VERSIONS, env)["choice"] == {"xla": True}
    assert tuning_cache.find(match, {**VERSIONS, "keras": "3.16.0"}, env) is None


def test_cache_directory_follows_the_environment(tmp_path):
    assert tuning_cache.directory({tuning_cache.ENV: "/x"}) == "/x/autotune"
    assert tuning_cache.directory({"XDG_CACHE_HOME": "/y"}) == "/y/tfpar/autotune"
    assert tuning_cache.directory({}) == os.path.join(os.path.expanduser("~"), ".cache", "tfpar", "autotune")
    env = {tuning_cache.ENV: str(tmp_path)}
    broken = tuning_cache.path_for(SHAPE, env)
    os.makedirs(os.path.dirname(broken))
    open(broken, "w").write("{not json")
    with pytest.raises(tuning_cache.Stale, match="cannot be read"):
        tuning_cache.load(SHAPE, VERSIONS, env)
