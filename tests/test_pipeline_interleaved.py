"""Interleaved 1F1B (tfpar.parallel.pipeline.schedules): V stages per device, round-robin.

The schedule's orders are checked here against their theory (ticks, what
each device holds); training runs in a subprocess with 4 logical CPUs
(tests/pipeline_worker.py ``interleaved``): 4 stages on 2 CPUs against the
unsplit model and 1F1B on 4 CPUs, weights after 3 SGD-momentum steps at
rtol 1e-5 + atol 1e-6 in float32, and the activations each device held
while the step was built in schedule order. The slow test runs the same
schedule on 2 processes (2 stages a task) against one process.
"""

import os

import keras
import pytest

from helpers import quiet_env, worker_json

from tfpar.parallel import pipeline
from tfpar.parallel.pipeline import balance, schedules, tasks

HERE = os.path.dirname(os.path.abspath(__file__))
IL = "interleaved_1f1b"


def test_orders_run_every_task_once_without_deadlock_and_match_the_theory():
    for D, V in [(2, 1), (2, 2), (2, 3), (3, 2), (4, 2), (4, 3)]:
        S = V * D
        for M in range(S, S + 2 * D + 1):
            orders = schedules.orders(IL, S, M, D)
            assert sorted(t for o in orders for t in o) == sorted((k, s, m) for k in "FB" for s in range(S)
                                                                  for m in range(M))
            assert all(t[1] % D == d for d, o in enumerate(orders) for t in o)  # round-robin
            ticks = len(schedules.ticks(orders))  # raises on a deadlock
            if M % D == 0:  # 2VM busy ticks of 2(VM + D - 1): the bubble (D-1)/(VM+D-1)
                assert ticks == 2 * (V * M + D - 1), (D, V, M)
                assert 1 - 2 * V * M / ticks == pytest.approx(schedules.bubble(S, M, D))
            else:
                assert (ticks > 2 * (V * M + D - 1)) == (V > 1)  # a last group short of D costs ticks
            assert schedules.in_flight(orders) == schedules.held_theory(IL, S, M, D) == \
                [S - d for d in range(D)], (D, V, M)
            if V == 1:
                assert orders == schedules.orders("1f1b", S, M)
    # the same micro-batches on the same 2 devices: interleaving 4 stages beats 1F1B's 2
    assert schedules.bubble(4, 8, 2) == pytest.approx(1 / 17) and schedules.bubble(2, 8) == pytest.approx(1 / 9)
    assert schedules.orders(IL, 4, 4, 2)[0] == [("F", 0, 0), ("F", 0, 1), ("F", 2, 0), ("F", 2, 1), ("B", 2, 0),
                                                ("F", 0, 2), ("B", 2, 1), ("F", 0, 3), ("B", 0, 0), ("F", 2, 2),
                                                ("B", 0, 1), ("F", 2, 3), ("B", 2, 2), ("B", 2, 3), ("B", 0, 2),
                                                ("B", 0, 3)]


def test_round_robin_cuts_minimise_the_modelled_step_of_each_devices_stages():
    import itertools

    import numpy as np

    # the per-stage optimum [3, 1, 1, 1] (stage sums 3, 4, 1, 4) loads device 1 with 4 + 4 = 8;
    # [1, 1, 2, 2] (sums 1, 1, 5, 5) loads each device with 6
    costs = [1, 1, 1, 4, 1, 4]
    assert balance.best_partition(costs, 4)[0] == [3, 1, 1, 1]
    assert balance.best_round_robin(costs, 4, 2) == ([1, 1, 2, 2], 6.0)
    rng = np.random.RandomState(2)
    for _ in range(15):  # against brute force: the modelled step at M micro-batches
        n, D, V, M = rng.randint(5, 10), rng.randint(2, 3), 2, rng.choice([4, 8])
        costs = list(rng.rand(n) * rng.choice([1, 10], n))

        def step(cuts):
            bounds = (0,) + cuts + (n,)
            return balance.round_robin_step([sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])], D, M)

        best = min(step(c) for c in itertools.combinations(range(1, n), V * D - 1))
        counts, _ = balance.best_round_robin(costs, V * D, D, M)
        assert step(tuple(np.cumsum(counts[:-1]).tolist())) == pytest.approx(best)
        assert sum(counts) == n and min(counts) >= 1
    assert balance.best_round_robin([1, 2, 3, 4], 2, 2)[0] == balance.best_partition([1, 2, 3, 4], 2)[0]


def test_round_robin_cuts_keep_the_slowest_stage_small_too():
    import itertools

    # ViT-S/16's units as timed (ms, with the timing's noise): embedding, 12 blocks, head
    costs = [4.0, 31.6, 29.6, 30.5, 32.4, 31.8, 27.5, 30.4, 28.8, 28.8, 29.6, 29.2, 31.2, 1.0]

    def sums(counts):
        bounds = [0, *itertools.accumulate(counts)]
        return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]

    def device_sums_only():  # the busiest device's sum alone, then the slowest stage: what cuts were before
        every = ([b - a for a, b in zip((0,) + c, c + (len(costs),))]
                 for c in itertools.combinations(range(1, len(costs)), 3))
        return min(every, key=lambda k: (max(sum(sums(k)[0::2]), sum(sums(k)[1::2])), max(sums(k))))

    assert device_sums_only() == [2, 6, 5, 1]  # devices 184 and 183 ms, but a 182 ms stage beside a 1 ms one
    counts, busiest = balance.best_round_robin(costs, 4, 2, 8)
    assert counts == [4, 3, 3, 4] and max(sums(counts)) < 100
    assert balance.round_robin_step(sums(counts), 2, 8) < balance.round_robin_step(sums([2, 6, 5, 1]), 2, 8)


def test_stage_table_and_task_names_show_several_stages_per_device():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = inputs
    for i in range(4):
        h = keras.layers.Dense(5, name=f"d{i}")(h)
    model = keras.Model(inputs, h)
    _, counts, rows = pipeline.plan_stages(model, 4, balance="params", devices=["/cpu:0", "/cpu:1"] * 2)
    assert counts == [1, 1, 1, 1] and [r["device"] for r in rows] == ["/cpu:0", "/cpu:1", "/cpu:0", "/cpu:1"]
    assert balance.per_device(rows) == {"/cpu:0": [0, 2], "/cpu:1": [1, 3]}
    text = balance.format_table(rows)
    assert "device /cpu:0 holds stages 0, 2: 65 params" in text and "device /cpu:1 holds stages 1, 3" in text
    assert tasks.stages_of(1, 4, 2) == (0, [1, 3]) and tasks.stages_of(3, 4, 2) == (1, [1, 3])
    assert tasks.stages_of(1, 2) == (0, [1])


def test_bad_interleaved_input_is_one_sentence():
    seq = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(3, name=f"d{i}") for i in range(4)])
    cpu = ["/cpu:0"] * 2
    with pytest.raises(schedules.ScheduleError, match=r"^Schedule interleaved_1f1b puts stages round-robin on the "
                       r"devices, so stages must be a multiple of the 2 device\(s\), got stages=3\.$"):
        pipeline.split(seq, stages=3, micro_batches=4, schedule=IL, devices=cpu)
    with pytest.raises(schedules.ScheduleError, match=r"at least as many micro-batches as stages: at least 4 for "
                                                      r"4 stages, got micro_batches=2\.$"):
        pipeline.split(seq, stages=4, micro_batches=2, schedule=IL, devices=cpu)
    with pytest.raises(ValueError, match=r"devices must name pipeline_devices x replicas = 2 devices, got 3"):
        pipeline.split(seq, stages=4, micro_batches=4, schedule=IL, pipeline_devices=2, devices=["/cpu:0"] * 3)
    with pytest.raises(schedules.ScheduleError, match=r"needs the device count: pass pipeline_devices=D"):
        pipeline.split(seq, stages=4, micro_batches=4, schedule=IL)
    with pytest.raises(schedules.ScheduleError, match=r"Schedule 1f1b puts one stage on each device, so it needs as "
                                                      r"many devices as stages \(4\), got 2"):
        pipeline.split(seq, stages=4, micro_batches=4, schedule="1f1b", pipeline_devices=2)


@pytest.mark.parametrize("args, message", [
    (["--stages=3", "--pipeline_devices=2"], "stages must be a multiple of the 2 device(s), got stages=3."),
    (["--stages=4", "--micro_batches=2", "--batch_size=8"], "at least 4 for 4 stages, got micro_batches=2."),
    (["--stages=4", "--micro_batches=4"], "say how many devices with --pipeline_devices=D (--stages = V x D)."),
])
def test_interleaved_flag_mistakes_exit_2(capsys, tmp_path, args, message):
    from tfpar.run import cli

    code = cli.main(["tfpar-train", "--strategy=pipeline", f"--schedule={IL}", f"--model_dir={tmp_path / 'run'}"]
                    + args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert message in err and err.count("tfpar-train: error:") == 1
    assert not os.path.exists(tmp_path / "run")


# ----- training on logical CPUs (subprocess) ---------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("interleaved") / "result.json")
    return worker_json("pipeline_worker.py", ["interleaved"], out, timeout=600, env=quiet_env())


def test_four_stages_on_two_cpus_match_the_unsplit_model_and_1f1b(worker):
    got = worker[IL]
    assert got["updates"] == 3 and got["moved"] > 1000  # training moved the weights far beyond the tolerance
    assert got["max_rel"] <= 1.0 and worker["1f1b"]["max_rel"] <= 1.0  # rtol 1e-5, atol 1e-6
    assert worker["vs_1f1b"] <= 1.0
    assert got["stage_devices"] == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
    assert got["variable_devices"] == [["CPU:0"], ["CPU:1"], ["CPU:0"], ["CPU:1"]]  # each stage's weights


def test_each_device_holds_no_more_activations_than_the_theory(worker):
    # S=4 on D=2 at M=8: device d holds S - d stage activations (each a quarter of the model), as 1F1B's
    # stages 0 and 1 of 4 do; GPipe would hold 2 x 8.
    assert worker["held"] == schedules.held_theory(IL, 4, 8, 2) == [4, 3]


# ----- across processes: 2 stages a task ---------------------------------------------------------
@pytest.mark.slow
def test_four_stages_on_two_tasks_train_as_one_process_on_two_cpus(tmp_path):
    from test_pipeline_tasks import _assert_same_run, _launch, _single_process

    flags = ["--stages=4", f"--schedule={IL}", "--epochs=1", "--backup_freq=none"]
    ref_dir, model_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = _single_process(ref_dir, flags + ["--pipeline_devices=2"])
    assert [d[-5:] for d in ref["pipeline"]["devices"]] == ["CPU:0", "CPU:1", "CPU:0", "CPU:1"]
    code, out, _ = _launch(model_dir, 2, flags + ["--tensorboard", "--profile_steps=3,4"])
    assert code == 0, out[-4000:]
    assert "worker-1 serves stages 1, 3 of copy 0" in out
    got, _ = _assert_same_run(model_dir, ref_dir)
    piped = got["pipeline"]
    task = "/job:worker/replica:0/task:{}/device:CPU:0"
    assert piped["devices"] == [task.format(0), task.format(1)] * 2 and piped["devices_per_copy"] == 2
    assert set(piped["variable_devices"]) == {task.format(0), task.format(1)}, piped["variable_devices"]
    assert piped["bubble_theory"] == pytest.approx(1 / 9, abs=1e-4)  # (D-1)/(VM+D-1), D=2, V=2, M=4
    # both tasks' traces, one row per task: the union of its two stages' ops
    timeline = piped["timeline"]
    assert set(timeline["busy_ms"]) == {"copy0/device0", "copy0/device1"}, timeline
    assert {t[0] for t in timeline["tasks"]} == {0, 1, 2, 3} and 0 < piped["bubble_measured"] < 1
