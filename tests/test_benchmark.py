"""scripts/benchmark.py: ratios, rounds and the markdown table (the measurements themselves run in
``scripts/benchmark.py --suite quick``; timing is never asserted in tests)."""

import importlib.util
import os

import pytest

spec = importlib.util.spec_from_file_location(
    "benchmark", os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py"))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def case(name, rates, batch=16, **extra):
    return dict(name=name, batch=batch, wall_sec=10.0, **benchmark.summarise(rates, batch), **extra)


def test_scaling_ratio_is_per_worker_and_errors_give_none():
    one, two = case("1 worker", [10.0, 9.0, 11.0]), case("2 workers", [18.0], workers=2)
    assert benchmark.ratio(two, one) == pytest.approx(0.9)
    assert benchmark.ratio({"error": "exit 1"}, one) is None


def test_rounds_pool_rates_and_take_the_median_of_per_round_ratios():
    rounds = [[case("keras", [10.0, 10.0]), case("tfpar", [9.0, 9.0])],
              [case("keras", [20.0, 20.0]), case("tfpar", [21.0, 21.0])],
              [case("keras", [10.0, 10.0]), case("tfpar", [10.0, 10.0])]]
    base, other = benchmark.merge_rounds(rounds)
    assert other["ratio"] == pytest.approx(1.0) and other["ratio_spread"] == pytest.approx([0.9, 1.05])
    assert other["windows_measured"] == 6 and other["rounds"] == 3 and other["wall_sec"] == 30.0
    assert base["images_per_sec"] == 10.0 and "ratio" not in base


def test_markdown_shows_ratios_targets_and_the_profile_table():
    first, second = benchmark.merge_rounds([[case("1 worker", [10.0]), case("2 workers", [16.0], workers=2)]])
    second["profile"] = {"step_ms": 2882.0, "compute_ms": 2175.0, "exposed_ms": 707.0, "all_reduce_ms": 701.0,
                         "overlap_ms": 13.0}
    report = {"machine": {"cpu": "cpu", "gpu": None}, "date": "2026-11-23", "suite": "default",
              "versions": {}, "comparisons": {"scaling": [first, second]}}
    text = benchmark.markdown(report)
    assert "| scaling | 2 workers | 16.0 | 16.0-16.0 | 0.80 | 0.90 |  | 0.95 |" in text
    assert "| scaling | 2 workers | 2882 | 2175 | 707 | 701 | 13 |" in text


def test_step_time_counts_every_micro_batch():
    accumulated = {"batch": 32, "train_options": {"grad_accum_steps": 4}}
    assert benchmark.examples_per_step(accumulated) == 128 and benchmark.examples_per_step({"batch": 32}) == 32
    assert benchmark.summarise([64.0], 128)["step_time_ms"] == pytest.approx(2000.0)


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_scaling_compares_the_same_work_per_worker(suite):
    one, two, ceiling = benchmark.suites(suite)["scaling"]
    assert (one.get("workers", 1), two["workers"]) == (1, 2)
    assert ceiling["ceiling"] and ceiling["copies"] == 2 and "workers" not in ceiling
    assert {k: v for k, v in ceiling.items() if k not in ("name", "copies", "ceiling")} == \
        {k: v for k, v in one.items() if k != "name"}  # the 1-worker case itself, twice at once
    assert benchmark.examples_per_step(two) == 2 * benchmark.examples_per_step(one)
    assert one["train_options"]["grad_accum_steps"] == two["train_options"]["grad_accum_steps"] > 1


def test_ceiling_is_two_independent_copies_and_multi_worker_cases_are_read_against_it():
    one = case("1 worker", [10.0])
    ceiling = case("ceiling", [18.0], copies=2, ceiling=True)
    two = case("2 workers", [16.0], workers=2)
    assert benchmark.ratio(ceiling, one) == pytest.approx(0.9)  # the machine's own efficiency against linear
    benchmark.add_ceiling_ratios([one, two, ceiling])
    assert two["ratio_to_ceiling"] == pytest.approx(16.0 / 18.0) and "ratio_to_ceiling" not in one
    assert benchmark.examples_per_step({"batch": 16, "copies": 2}) == 32  # each copy steps on its own batch


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_plain_scaling_compares_buckets_with_keras_single_all_reduce_and_the_ceiling(suite):
    one, buckets, single, ceiling = benchmark.suites(suite)["scaling_plain"]
    assert "train_options" not in buckets  # tfpar's default buckets
    assert single["train_options"] == {"all_reduce_bucket_mb": 0}
    assert ceiling["ceiling"] and ceiling["copies"] == 2


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_pipeline_compares_two_traced_stages_with_one_device(suite):
    one, m4, m8, *interleaved = benchmark.suites(suite)["pipeline"]
    assert one["strategy"] == "one_device" and (m4["virtual_cpus"], m8["virtual_cpus"]) == (2, 2)
    # 1F1B on 2 stages beside interleaved 1F1B on 4 stages (2 a device), at the same micro-batches
    assert [c["train_options"]["schedule"] for c in interleaved] == ["1f1b", "interleaved_1f1b"]
    assert [c["train_options"]["stages"] for c in interleaved] == [2, 4]
    assert len({c["train_options"]["micro_batches"] for c in interleaved}) == 1
    assert [c["train_options"]["micro_batches"] for c in (m4, m8)] == [4, 8]
    assert all(c["pipeline_trace"] and c["train_options"]["schedule"] == "gpipe" for c in (m4, m8))
    assert benchmark.examples_per_step(m4) == benchmark.examples_per_step(one)  # the same batch per step


def test_markdown_shows_the_measured_bubble_beside_the_theory():
    one, two = benchmark.merge_rounds([[case("1 device", [10.0]),
                                        case("2 stages", [12.0], bubble_measured=0.27, bubble_theory=0.2,
                                             stage_ms=[40.0, 38.0])]])
    report = {"machine": {"cpu": "cpu", "gpu": None}, "date": "2026-12-01", "suite": "default",
              "versions": {}, "comparisons": {"pipeline": [one, two]}}
    text = benchmark.markdown(report)
    assert "| pipeline | 2 stages | 12.0 | 12.0-12.0 | 1.20 |  |" in text
    assert "| pipeline | 2 stages | 0.27 | 0.20 | 40, 38 |" in text


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_pipeline_vs_data_parallel_runs_both_models_on_the_same_two_pinned_processes(suite):
    cases = benchmark.suites(suite)["pipeline_vs_data_parallel"]
    assert [c["model"] for c in cases] == ["vgg16_bn"] * 4 + ["resnet50"] * 4
    for one, plain, accumulated, piped in (cases[:4], cases[4:]):
        assert one.get("workers", 1) == 1 and all(c["pin"] for c in (one, plain, accumulated, piped))
        assert plain["workers"] == accumulated["workers"] == piped["workers"] == 2
        assert plain["batch"] == 2 * one["batch"] and piped["batch"] == 8 * one["batch"]  # micro-batches of one batch
        assert accumulated["train_options"]["all_reduce_dtype"] == "bfloat16"
        assert accumulated["train_options"]["grad_accum_steps"] > 1
        assert piped["strategy"] == "pipeline" and piped["train_options"]["micro_batches"] == 8
        assert piped["train_options"]["stages"] == 2


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_pipeline_vit_runs_every_schedule_at_the_same_m_beside_data_parallel(suite):
    one, data, *piped = benchmark.suites(suite)["pipeline_vit"]
    assert {c["model"] for c in (one, data, *piped)} == {"vit_s16"} and all(c["pin"] for c in (one, data, *piped))
    assert all(c["train_options"]["patch_size"] == 4 for c in (one, data, *piped))
    assert data["strategy"] == "multi_worker" and data["workers"] == 2
    assert [c["train_options"]["schedule"] for c in piped] == ["gpipe", "1f1b", "interleaved_1f1b"]
    assert [c["train_options"]["stages"] for c in piped] == [2, 2, 4]
    assert {c["train_options"]["micro_batches"] for c in piped} == {8} and all(c["pipeline_trace"] for c in piped)
    # the same global batch: 8 micro-batches of the 1-process batch, or half of it on each data-parallel worker
    assert {benchmark.examples_per_step(c) for c in (data, *piped)} == {8 * one["batch"]}


def test_a_comparison_of_two_models_reads_each_against_its_own_first_case():
    rows = benchmark.merge_rounds([[case("a 1", [10.0], model="a"), case("a 2", [16.0], model="a", workers=2),
                                    case("b 1", [4.0], model="b"), case("b 2", [6.0], model="b", workers=2)]])
    assert "ratio" not in rows[0] and "ratio" not in rows[2]
    assert rows[1]["ratio"] == pytest.approx(0.8) and rows[3]["ratio"] == pytest.approx(0.75)


@pytest.mark.parametrize("suite", ["default", "quick"])
def test_stragglers_has_the_four_cases_and_the_two_solo_speeds(suite):
    cases = benchmark.suites(suite)["stragglers"]
    solo = [c for c in cases if c.get("solo")]
    assert [c.get("core", 0) for c in solo] == [0, 1] and "busy_core" in solo[1] and "busy_core" not in solo[0]
    two = [c for c in cases if c.get("workers") == 2]
    slowed = [c for c in two if "busy_core" in c]
    assert len(two) == 4 and len(slowed) == 3  # balanced, plain, asynchronous; the reference has no straggler
    balanced, plain, ps = slowed
    assert balanced["train_options"]["balance_batches"] and "balance_batches" not in plain["train_options"]
    assert ps["strategy"] == "parameter_server" and ps["ps"] == 1
    # the same examples per window: a parameter-server step is one worker's batch
    assert ps["steps"] * benchmark.examples_per_step(ps) == plain["steps"] * benchmark.examples_per_step(plain)
    assert benchmark.examples_per_step(plain) == 2 * benchmark.examples_per_step(solo[0])


def test_the_ideal_is_the_sum_of_the_solo_speeds():
    cases = [case("core 0 alone", [10.0], solo=True), case("balanced", [13.5], workers=2),
             case("core 1 slowed, alone", [5.0], solo=True)]
    benchmark.add_ideal_ratios(cases)
    assert cases[1]["ratio_to_ceiling"] == pytest.approx(0.9) and cases[1]["ideal_images_per_sec"] == 15.0
    assert "ratio_to_ceiling" not in cases[0]


def test_markdown_lists_the_straggler_cases_with_loss_staleness_and_shares():
    cases = [case("core 0 alone", [10.0], solo=True),
             case("balanced", [13.5], workers=2, train_loss=0.5, worker_times={"shares": [22, 10]}),
             case("async", [12.0], workers=2, train_loss=0.7, staleness=0.69),
             case("core 1 slowed, alone", [5.0], solo=True)]
    benchmark.add_ideal_ratios(cases)
    report = {"machine": {"cpu": "cpu", "gpu": None}, "date": "2026-12-02", "suite": "quick",
              "versions": {}, "comparisons": {"stragglers": cases}}
    text = benchmark.markdown(report)
    assert "| balanced | 13.5 | 0.90 | 0.500 |  | 22, 10 |" in text
    assert "| async | 12.0 | 0.80 | 0.700 | 0.69 |  |" in text
    assert benchmark.straggler_line(cases[2]) == "loss 0.700, staleness 0.69"


def test_autotune_is_read_against_the_best_manual_setting_and_the_default():
    cases = [case("gemma tfpar default (untuned)", [10.0], model="gemma"),
             case("gemma manual: XLA off", [10.0], model="gemma"),
             case("gemma manual: XLA on", [14.0], model="gemma"),
             case("gemma autotuned", [13.8], model="gemma", kind="bench_autotuned",
                  autotune={"choice": {"xla": True, "micro_batches": 1}, "tune_sec": 5.0})]
    tuned = benchmark.bench_autotune.add_autotune_ratios(cases)[-1]
    assert tuned["ratio_to_best_manual"] == pytest.approx(13.8 / 14.0)
    assert tuned["ratio_to_default"] == pytest.approx(1.38) and tuned["best_manual"] == "gemma manual: XLA on"
    text = benchmark.markdown({"machine": {"cpu": "x", "gpu": None}, "date": "d", "suite": "default",
                               "versions": {}, "comparisons": {"autotune": cases}})
    assert "/ best manual (gemma manual: XLA on) 0.986 (target 0.97), / untuned default 1.380" in text


def test_the_autotune_sweep_adds_bfloat16_where_the_cpu_has_it_and_reads_the_choice_with_its_policy(monkeypatch):
    from tfpar.runtime import precision

    bench = benchmark.bench_autotune
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert bench.precisions({}) == ["float32"]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert bench.precisions({}) == ["float32", "mixed_bfloat16"]
    assert bench.precisions({"TF_ENABLE_ONEDNN_OPTS": "0"}) == ["float32"]  # tfpar's rule: bf16 goes through oneDNN
    assert bench.precisions({"TFPAR_BENCH_PRECISIONS": "float32"}) == ["float32"]

    gemma = [c for c in bench.autotune_cases(True, ["float32", "mixed_bfloat16"]) if c["model"] == "gemma"]
    assert gemma[0]["setting"]["precision"] == "float32" and not gemma[0]["setting"]["xla"]  # tfpar's default
    manual = [c for c in gemma if " manual: " in c["name"]]
    assert len(manual) == 2 * 2 * 3  # policies x XLA x micro-batches
    assert "gemma manual: XLA on, 2 micro-batch(es), mixed_bfloat16" in [c["name"] for c in manual]
    assert gemma[-1]["kind"] == "bench_autotuned" and gemma[-1]["policies"] == ["float32", "mixed_bfloat16"]
    assert all(", float32" not in c["name"] for c in bench.autotune_cases(True, ["float32"]))

    on = {"xla": True, "micro_batches": 2}
    cases = [case("g tfpar default (untuned)", [10.0], model="g", setting={"xla": False, "micro_batches": 1}),
             case("g manual: fp32", [12.0], model="g", setting=dict(on, precision="float32")),
             case("g manual: bf16", [20.0], model="g", setting=dict(on, precision="mixed_bfloat16")),
             case("g autotuned", [19.6], model="g", kind="bench_autotuned", policies=["float32", "mixed_bfloat16"],
                  autotune={"choice": dict(on, precision="mixed_bfloat16"), "tune_sec": 5.0})]
    tuned = bench.add_autotune_ratios(cases)[-1]
    assert tuned["same_as_best"] and tuned["choice_in_sweep"] == pytest.approx(1.0)
    assert tuned["ratio_to_default"] == pytest.approx(1.96)
    assert "chose XLA on, 2 micro-batch(es), mixed_bfloat16 in 5 s" in bench.lines([tuned])[0]
    cases[-1]["autotune"]["choice"]["precision"] = "float32"  # the same XLA and micro-batches, the other policy
    assert not bench.add_autotune_ratios(cases)[-1]["same_as_best"]


def test_rounds_below_one_stop_with_one_sentence(capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["--rounds", "0", "--only", "autotune", "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "--rounds must be 1 or more, not 0." in capsys.readouterr().err


def test_autotune_ratios_are_taken_round_by_round():
    """Per-round ratios (1.2 and 0.8: median 1.0), not pooled rates (14 / 15 = 0.93)."""
    manual = [case("g manual: XLA off", [8.0, 16.0], model="g", round_rates=[8.0, 16.0],
                   setting={"xla": False, "micro_batches": 1}),
              case("g manual: XLA on", [10.0, 20.0], model="g", round_rates=[10.0, 20.0],
                   setting={"xla": True, "micro_batches": 1})]
    tuned = case("g autotuned", [12.0, 16.0], model="g", kind="bench_autotuned", round_rates=[12.0, 16.0],
                 autotune={"choice": {"xla": True, "micro_batches": 1}, "tune_sec": 5.0})
    benchmark.bench_autotune.add_autotune_ratios(manual + [tuned])
    assert tuned["images_per_sec"] / manual[1]["images_per_sec"] == pytest.approx(14 / 15)
    assert tuned["ratio_to_best_manual"] == pytest.approx(1.0) and tuned["same_as_best"]
    assert tuned["choice_in_sweep"] == pytest.approx(1.0)
    assert "the same setting" in benchmark.bench_autotune.lines([tuned])[0]
