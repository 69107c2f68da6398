"""tfpar-train: flags, --flagfile, --help, exit code 2 on mistakes, and real end-to-end runs."""

import dataclasses
import json
import os

import pytest

from helpers import event_scalars

from helpers import quiet_env, run_reaped, tfpar_train_command

from tfpar.run import cli
from tfpar.run.config import TrainConfig

TINY = ["--model=resnet18", "--width_multiplier=0.125", "--image_size=16", "--epochs=2",
        "--steps_per_epoch=4", "--validation_steps=2", "--verbose=0"]


def tfpar_train(args, timeout=420):
    """Run the installed console script (or ``-m tfpar.cli``) in its own process group; always reaped."""
    return run_reaped(tfpar_train_command() + args, timeout, env=quiet_env())


def error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("tfpar-train: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_flags_mirror_every_config_field():
    config = cli.config_from_flags(["tfpar-train", "--model=vgg11", "--per_replica_batch_size=8", "--notensorboard",
                                    "--profile_steps=2,3", "--learning_rate=0.2", "--jit_compile=off"])
    assert (config.model, config.per_replica_batch_size, config.tensorboard) == ("vgg11", 8, False)
    assert (config.profile_range(), config.learning_rate, config.jit_compile) == ((2, 3), 0.2, "off")
    again = cli.config_from_flags(["tfpar-train"])  # a second parse starts from the defaults
    assert again == TrainConfig()


def test_flagfile(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--model=resnet34\n--epochs=7\n# a comment\n--data=synthetic\n")
    config = cli.config_from_flags(["tfpar-train", f"--flagfile={flagfile}", "--epochs=9"])
    assert (config.model, config.epochs, config.data) == ("resnet34", 9, "synthetic")


def test_help_lists_every_flag_with_help(capsys):
    assert cli.main(["tfpar-train", "--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name}:" in text or f"--[no]{field.name}:" in text, field.name
        assert cli._HELP[field.name]
    assert set(cli._HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "--flagfile" in text and "dtensor" in text and "tfrecord:GLOB" in text


def _corrupt_folder(p):
    os.makedirs(p / "cls")
    (p / "cls" / "broken.jpg").write_bytes(b"\x00garbage")


@pytest.mark.parametrize("args, setup, message", [
    (["--model=resnet7"], None, "Unknown model 'resnet7'"),
    (["--batch_size=-4"], None, "batch_size must be a positive integer"),
    (["--profile_steps=5,2"], None, "profile_steps must be 'A,B'"),
    (["--data=folder:{p}/missing"], None, "does not exist"),
    (["--data=folder:{p}"], None, "no class folders"),
    (["--data=folder:{p}", "--num_classes=1"], _corrupt_folder, "not a readable JPEG"),
    (["--data=cifar10:{p}"], None, "lacks the cifar10 file"),
    (["--epochs=abc"], None, "flag --epochs=abc"),
    (["--no_such_flag=1"], None, "Unknown command line flag 'no_such_flag'"),
    (["positional"], None, "Unexpected argument"),
    (["--flagfile={p}/none.flags"], None, "Unable to open flagfile"),
    (["--strategy=dtensor", "--mesh=2x2"], None, "mesh must look like"),
    (["--all_reduce_bucket_mb=-1"], None, "all_reduce_bucket_mb must be a number >= 0"),
])
def test_mistakes_exit_2_with_one_sentence(tmp_path, capsys, args, setup, message):
    if setup:
        setup(tmp_path)
    code = cli.main(["tfpar-train"] + [a.format(p=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    line = error_line(err)
    assert message in line and line.endswith(".")


def test_batch_not_divisible_by_replicas_exits_2(tmp_path):
    code, _, err = tfpar_train(["--strategy=mirrored", "--virtual_cpus=2", "--batch_size=15",
                                f"--model_dir={tmp_path}"] + TINY, timeout=180)
    assert code == 2
    assert "does not divide evenly over 2 replicas" in error_line(err)


@pytest.mark.slow
def test_one_device_end_to_end_with_profile(tmp_path):
    code, out, err = tfpar_train(["--strategy=one_device", "--batch_size=16", "--profile_steps=2,3",
                                  f"--model_dir={tmp_path}"] + TINY)
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["strategy"], summary["replicas"], summary["epochs_done"], summary["steps_done"]) == (
        "one device (CPU)", 1, 2, 8)  # TF's default strategy on the host CPU (tfpar.strategies)
    assert summary["strategy_class"] == "tf.distribute.Strategy"
    assert summary["versions"]["tensorflow"] and summary["config"]["profile_steps"] == "2,3"
    assert 0 <= summary["val_accuracy"] <= 1 and summary["examples_per_sec"] > 0
    assert json.loads((tmp_path / "summary.worker-0.json").read_text())["weights_sha256"] == summary["weights_sha256"]
    profiles = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "train" / "plugins" / "profile") for f in fs]
    assert any(p.endswith(".xplane.pb") and os.path.getsize(p) > 0 for p in profiles), profiles
    tags = event_scalars(tmp_path / "train")
    assert len(tags["throughput/examples_per_sec"]) == 2 and len(tags["throughput/step_time_ms"]) == 2
    assert all(v > 0 for v in tags["throughput/examples_per_sec"])
    assert "epoch_loss" in tags and "epoch_examples_per_sec" in tags
    assert "epoch 2/2: loss " in out and "done: val_accuracy=" in out


@pytest.mark.slow
def test_mirrored_two_virtual_cpus_end_to_end_from_flagfile(tmp_path):
    flagfile = tmp_path / "mirrored.flags"
    flagfile.write_text("\n".join(["--strategy=mirrored", "--virtual_cpus=2", "--per_replica_batch_size=8",
                                   "--notensorboard", f"--model_dir={tmp_path / 'run'}"] + TINY) + "\n")
    code, out, err = tfpar_train([f"--flagfile={flagfile}"])
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["strategy"], summary["replicas"], summary["global_batch_size"]) == ("mirrored ×2", 2, 16)
    assert summary["strategy_class"] == "tf.distribute.MirroredStrategy"
    assert summary["steps_done"] == 8 and summary["train_loss"] > 0
    assert not (tmp_path / "run" / "train").exists()  # --notensorboard


@pytest.mark.slow
def test_gradient_accumulation_over_two_replicas_trains(tmp_path):
    """Keras 3.15's own accumulation fails under a strategy; tfpar's makes one update of 2 micro-batches a step."""
    code, out, err = tfpar_train(["--strategy=mirrored", "--virtual_cpus=2", *TINY, "--batch_size=16",
                                  "--grad_accum_steps=2", "--notensorboard", f"--model_dir={tmp_path}"], timeout=300)
    assert code == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["replicas"], summary["global_batch_size"], summary["examples_per_update"]) == (2, 16, 32)
    assert summary["steps_done"] == summary["optimizer_updates"] == 8
    assert summary["train_loss"] > 0 and "x 2 micro-batches per update" in out
