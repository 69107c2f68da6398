"""tfpar.run.autotune: trials that leave training unchanged, the pick from a fake clock, the cache, bad input.

No test here times anything: the trial clock is fake, and advances by a cost read from the setting the
model has while the trial runs, so the fastest setting is known in advance.
"""

import json
import os

import numpy as np
import pytest

from helpers import quiet_env, run_reaped, tfpar_train_command

STEPS = 4


def _data():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(64, seed=3).repeat().batch(16)


def _model():
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.25, seed=2), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _state(model):
    return [v.numpy().copy() for v in list(model.variables) + list(model.optimizer.variables)]


def _fake_clock(model):
    """A clock that advances per call by the step cost of the model's setting now: XLA on and 2
    micro-batches are fastest, so the search must end at exactly that setting."""
    from tfpar.run import autotune

    now, calls = [0.0], []

    def clock():
        setting = autotune.current_setting(model)
        now[0] += (1.0 if setting["xla"] else 2.0) + {1: 0.3, 2: 0.0, 4: 0.6}[setting["micro_batches"]]
        calls.append(now[0])
        return now[0]

    return clock, calls


@pytest.mark.slow
def test_trials_leave_training_unchanged_and_the_cache_is_used_then_refused(tmp_path):
    from tfpar.core import summary, tuning_cache
    from tfpar.run import autotune
    from tfpar.step import steps, xla

    env = {tuning_cache.ENV: str(tmp_path)}
    tuned = _model()
    tuned.fit(_data(), epochs=1, steps_per_epoch=2, verbose=0)  # optimizer slots and a moved dropout seed exist
    before = _state(tuned)
    clock, calls = _fake_clock(tuned)
    lines = []
    data = _data()  # the run's own; trials read a copy made by _data
    report = autotune.autotune(tuned, None, _data, clock=clock, print_fn=lines.append, environ=env)
    assert report["choice"] == {"xla": True, "bucket_mb": 0.0, "all_reduce_dtype": "float32", "micro_batches": 2}
    # XLA and micro-batches together: every pair of (off, on) x (1, 2, 4), the start first
    assert len(report["trials"]) == 6 and report["cached"] is None
    assert any("<- chosen" in line for line in lines) and lines[-1].startswith("autotune: chose XLA on")
    after = _state(tuned)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a trial changed the model's state"
    assert xla.state(tuned)["train"] == "xla" and steps.micro_batches(tuned) == 2
    assert tuned.train_function is not None  # the run keeps the step its trial traced, not a second trace

    # the same model given that choice by hand trains bit-identically
    by_hand = _model()
    by_hand.fit(_data(), epochs=1, steps_per_epoch=2, verbose=0)
    xla.enable(by_hand, "on")
    steps.accumulate(by_hand, 2)
    tuned.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0)
    by_hand.fit(_data(), epochs=1, steps_per_epoch=STEPS, verbose=0)
    assert summary.weights_checksum(tuned) == summary.weights_checksum(by_hand)

    # the next model of this shape uses the cached choice, and says so, with no trial
    again = _model()
    clock, calls = _fake_clock(again)
    lines.clear()
    report = autotune.autotune(again, None, _data, clock=clock, print_fn=lines.append, environ=env)
    assert report["cached"] and not calls and "no trials" in lines[0]
    assert steps.micro_batches(again) == 2 and xla.state(again)["train"] == "xla"
    assert autotune.cached_xla(again, env) == (True, report["cached"])  # jit_compile=auto reads it

    # a file from other versions is refused with one warning line and tuned again
    entry = json.load(open(report["cached"]))
    entry["versions"]["keras"] = "3.0.0"
    json.dump(entry, open(report["cached"], "w"))
    lines.clear()
    report = autotune.autotune(again, None, _data, clock=clock, print_fn=lines.append, environ=env, budget=7)
    assert lines[0].startswith("warning: autotune cache file") and "keras 3.0.0" in lines[0]
    assert report["cached"] is None and len(report["trials"]) == 1  # a budget of 7 steps: one trial


def test_bad_input_is_one_sentence():
    from tfpar.core import tuning
    from tfpar.run import autotune

    model = _model()
    with pytest.raises(tuning.NothingToTune, match="Nothing to tune on this model and strategy: XLA is fixed, "
                                                   "one replica sums no gradients, micro-batches are fixed"):
        autotune.autotune(model, None, _data(), tune=(), cache=False)
    with pytest.raises(ValueError, match=r"autotune_budget 0.05 of 40 planned steps is 2, fewer than the 7 steps"):
        autotune.autotune(model, None, _data(), budget=0.05, planned_steps=40, cache=False)
    with pytest.raises(ValueError, match="needs the training tf.data.Dataset"):
        autotune.autotune(model, None, iter(_data()), cache=False)


@pytest.mark.parametrize("flags, message", [
    (["--jit_compile=off", "--all_reduce_bucket_mb=25", "--all_reduce_dtype=float32", "--grad_accum_steps=1"],
     "--autotune has nothing to tune"),
    (["--strategy=pipeline"], "pipeline is not tuned yet"),
    (["--autotune_budget=0"], "autotune_budget must be a positive fraction"),
])
def test_cli_refuses_what_autotune_cannot_do(flags, message, capsys):
    from tfpar.run import cli

    assert cli.main(["tfpar-train", "--autotune", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_cli_keeps_given_flags_fixed():
    from tfpar.run import cli

    config = cli.config_from_flags(["tfpar-train", "--autotune", "--all_reduce_dtype=float32"])
    assert config.autotune_settings() == ["xla", "bucket_mb", "micro_batches"]
    config = cli.config_from_flags(["tfpar-train", "--autotune", "--autotune_keep=jit_compile"])
    assert config.autotune_settings() == ["bucket_mb", "all_reduce_dtype", "micro_batches"]


@pytest.mark.slow
def test_tfpar_train_autotune_ends_bit_identical_to_its_choice_set_by_hand(tmp_path):
    """Two replicas, so the all-reduce is tuned too; a budget of 21 steps allows 3 trials of 7."""
    common = ["--model=vgg11", "--width_multiplier=0.125", "--image_size=32", "--strategy=mirrored",
              "--virtual_cpus=2", "--batch_size=16", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
              "--tensorboard=false", "--checkpoint_best=false", "--backup_freq=none"]
    env = quiet_env(TFPAR_CACHE_DIR=str(tmp_path / "cache"))
    tuned_dir, hand_dir = tmp_path / "tuned", tmp_path / "hand"
    code, out, err = run_reaped(tfpar_train_command() + common + [
        "--autotune", "--autotune_budget=21", f"--model_dir={tuned_dir}"], 600, env=env)
    assert code == 0, (out + err)[-3000:]
    assert "autotune: 3 trials of 7 steps (the budget ended the search early):" in out
    tuned = json.load(open(tuned_dir / "summary.json"))
    choice = tuned["autotune"]["choice"]
    assert len(tuned["autotune"]["trials"]) == 3 and tuned["autotune"]["cut_short"]
    assert os.listdir(tmp_path / "cache" / "autotune")
    k = choice["micro_batches"]
    code, out, err = run_reaped(tfpar_train_command() + common[:5] + common[6:] + [
        f"--batch_size={16 // k}", f"--grad_accum_steps={k}", f"--jit_compile={'on' if choice['xla'] else 'off'}",
        f"--all_reduce_bucket_mb={choice['bucket_mb']}", f"--all_reduce_dtype={choice['all_reduce_dtype']}",
        f"--model_dir={hand_dir}"], 600, env=env)
    assert code == 0, (out + err)[-3000:]
    hand = json.load(open(hand_dir / "summary.json"))
    assert tuned["optimizer_updates"] == hand["optimizer_updates"] == 3
    assert tuned["weights_sha256"] == hand["weights_sha256"]


def test_precision_trials_time_a_model_per_policy_name_its_numerics_and_are_cached(tmp_path):
    """``tune_precision`` builds one model per policy; a fake clock makes mixed_bfloat16 the faster one."""
    import keras

    from tfpar.run import autotune

    def build(policy):
        keras.mixed_precision.set_global_policy(policy)
        return _model()

    def clock():  # a step under the policy the trial's model was built in
        now[0] += 1.0 if keras.mixed_precision.global_policy().name == "mixed_bfloat16" else 2.0
        return now[0]

    now, lines, env = [0.0], [], {"TFPAR_CACHE_DIR": str(tmp_path)}
    try:
        policy, report = autotune.tune_precision(build, _data, ["float32", "mixed_bfloat16"], batch_size=16,
                                                 clock=clock, print_fn=lines.append, environ=env)
        assert policy == "mixed_bfloat16" and report["cached"] is None
        assert [t["setting"]["precision"] for t in report["trials"]] == ["float32", "mixed_bfloat16"]
        assert lines[0] == "autotune: 2 precision trials of 7 steps, each on its own model:"
        assert "float32 compute and weights" in lines[2] and "bfloat16 compute, float32 weights" in lines[3]
        assert "<- chosen" in lines[3] and lines[-1] == "autotune: chose precision mixed_bfloat16."
        # the next run of this shape: one model built for its signature, no trial
        lines.clear()
        policy, report = autotune.tune_precision(build, _data, ["float32", "mixed_bfloat16"], batch_size=16,
                                                 clock=clock, print_fn=lines.append, environ=env)
        assert policy == "mixed_bfloat16" and report["cached"] and "no trials" in lines[0] and len(lines) == 1
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_precision_candidates_put_autos_rule_first():
    from tfpar.runtime import precision

    found = precision.candidates()
    assert found[0] == precision.resolve("auto") and sorted(found) == ["float32", "mixed_bfloat16"]  # a CPU


@pytest.mark.slow
def test_tfpar_train_times_precision_then_the_rest_and_ends_as_its_choice_set_by_hand(tmp_path):
    """--precision=auto --autotune: a model per policy is timed first; the run equals the choice set by hand."""
    common = ["--model=vgg11", "--width_multiplier=0.125", "--image_size=32", "--strategy=one_device",
              "--batch_size=16", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
              "--tensorboard=false", "--checkpoint_best=false", "--backup_freq=none"]
    env = quiet_env(TFPAR_CACHE_DIR=str(tmp_path / "cache"))
    tuned_dir, hand_dir = tmp_path / "tuned", tmp_path / "hand"
    code, out, err = run_reaped(tfpar_train_command() + common + [
        "--autotune", "--precision=auto", "--autotune_budget=21", f"--model_dir={tuned_dir}"], 600, env=env)
    assert code == 0, (out + err)[-3000:]
    assert "autotune: 2 precision trials of 7 steps, each on its own model:" in out
    assert "bfloat16 compute, float32 weights" in out
    tuned = json.load(open(tuned_dir / "summary.json"))
    report = tuned["autotune"]
    assert {t["setting"]["precision"] for t in report["precision"]["trials"]} == {"float32", "mixed_bfloat16"}
    assert tuned["precision"] == report["precision"]["choice"]["precision"]
    # 21 steps allow 3 trials: no room for a precision runoff (4), so the rest (21 - 2 x 7 steps) is one trial
    assert len(report["trials"]) == 1 and report["cut_short"]
    choice = report["choice"]
    code, out, err = run_reaped(tfpar_train_command() + common + [
        f"--precision={tuned['precision']}", f"--jit_compile={'on' if choice['xla'] else 'off'}",
        f"--model_dir={hand_dir}"], 600, env=env)
    assert code == 0, (out + err)[-3000:]
    hand = json.load(open(hand_dir / "summary.json"))
    assert tuned["weights_sha256"] == hand["weights_sha256"] and hand["precision"] == tuned["precision"]

    # the same run again: both choices come from the cache, with no trial, and it trains the same
    code, out, err = run_reaped(tfpar_train_command() + common + [
        "--autotune", "--precision=auto", "--autotune_budget=21", f"--model_dir={tmp_path / 'again'}"], 600, env=env)
    assert code == 0, (out + err)[-3000:]
    assert "autotune: the cached precision for this model and devices" in out and "trials of" not in out
    assert "autotune: the cached choice for this model and devices" in out
    again = json.load(open(tmp_path / "again" / "summary.json"))
    assert again["weights_sha256"] == tuned["weights_sha256"] and again["autotune"]["precision"]["cached"]
