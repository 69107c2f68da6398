"""A quiet start: no TensorFlow C++ start-up log from tfpar-train and tfpar-launch, real errors kept."""

import json
import os
import re
import sys

import pytest

from helpers import run_reaped, tfpar_train_command

from tfpar.run import cli
from tfpar.runtime import precision
from tfpar.core import quiet

CPP_LOG = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog", re.MULTILINE)
PRIVATE_CLASS = re.compile(r"\b_[A-Z]\w*")  # _DefaultDistributionStrategy and the like
INFO = "I0000 00:00:1796155642.683136   16528 port.cc:153] oneDNN custom operations are on."
WARNING = "W0000 00:00:1796155642.683136   16528 cpu_feature_guard.cc:227] Slower than it could be."
ERROR = "E1201 20:01:02.123456   16528 some_kernel.cc:77] a real error."
CUINIT = ("E0000 00:00:1796155283.925604    6635 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
          "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
FATAL = "F1201 20:01:02.123456   16528 check.cc:1] Check failed: x"


def user_env(**extra):
    """The environment of a user who never heard of TF_CPP_MIN_LOG_LEVEL."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CONFIG")}
    return dict(env, **extra)


def test_keep_hides_what_is_below_the_level_and_keeps_real_errors():
    shown = lambda level, driver=False: [  # noqa: E731
        line for line in (quiet.PRE_INIT_NOTICE, INFO, WARNING, ERROR, CUINIT, FATAL, "tfpar says hello")
        if quiet.keep(line, level, driver)]
    assert shown(2) == [ERROR, FATAL, "tfpar says hello"]
    assert shown(2, driver=True) == [ERROR, CUINIT, FATAL, "tfpar says hello"]  # with a driver it means something
    assert shown(1) == [WARNING, ERROR, FATAL, "tfpar says hello"]
    assert shown(3) == [FATAL, "tfpar says hello"]
    assert len(shown(0)) == 7


def test_level_flag_then_environment_then_2():
    assert quiet.level(None, {}) == 2
    assert quiet.level(None, {"TF_CPP_MIN_LOG_LEVEL": "0"}) == 0
    assert quiet.level(1, {"TF_CPP_MIN_LOG_LEVEL": "0"}) == 1
    assert quiet.level(None, {"TF_CPP_MIN_LOG_LEVEL": "loud"}) == 2
    assert cli.tf_log_level_from(["tfpar-train", "--model=vgg11", "--tf_log_level=0"]) == 0
    assert cli.tf_log_level_from(["tfpar-train", "--epochs=3"]) is None
    assert cli.tf_log_level_from(["tfpar-train", "--tf_log_level=9"]) is None  # main reports it
    assert cli.main(["tfpar-train", "--tf_log_level=9"]) == 2


def test_importing_the_cli_leaves_the_environment_alone():
    code, out, err = run_reaped([sys.executable, "-c", "import os, tfpar.cli, tfpar.train, tfpar.launcher; "
                                 "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), 'tensorflow' in __import__('sys')"
                                 ".modules)"], 120, env=user_env())
    assert (code, out.split()) == (0, ["None", "False"]), err


@pytest.mark.slow
def test_the_level_flag_brings_the_start_up_lines_back():
    probe = ("import sys; from tfpar.core import quiet; quiet.start_tensorflow(int(sys.argv[1])); "
             "import tensorflow as tf; tf.config.list_physical_devices(); print('ready')")
    lines = {}
    for level in (2, 0):
        code, out, err = run_reaped([sys.executable, "-c", probe, str(level)], 180, env=user_env())
        assert code == 0 and out.strip() == "ready", err
        lines[level] = CPP_LOG.findall(err)
    assert lines[2] == [] and lines[0], lines  # TF 2.21 logs at import; level 0 shows it, level 2 none of it


def test_launcher_gives_its_tasks_level_2_and_drops_their_start_up_lines(tmp_path):
    task = (f"import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL']); print({INFO!r}); print({ERROR!r}); "
            f"print({quiet.PRE_INIT_NOTICE!r}); print('done')")
    code, out, err = run_reaped([sys.executable, "-m", "tfpar.launcher", "--workers", "1", "--timeout", "60", "--",
                                 sys.executable, "-c", task], 90, env=user_env())
    streamed = [line for line in out.splitlines() if line.startswith("[worker-0] ")]
    assert code == 0, out + err
    assert streamed == ["[worker-0] 2", f"[worker-0] {ERROR}", "[worker-0] done"]
    code, out, _ = run_reaped([sys.executable, "-m", "tfpar.launcher", "--workers", "1", "--tf_log_level", "0",
                               "--", sys.executable, "-c", task], 90, env=user_env())
    streamed = [line for line in out.splitlines() if line.startswith("[worker-0] ")]
    assert code == 0 and streamed == [f"[worker-0] {line}" for line in ("0", INFO, ERROR, quiet.PRE_INIT_NOTICE,
                                                                         "done")]


@pytest.mark.slow
def test_tfpar_train_starts_quietly_and_speaks_plainly(tmp_path):
    """Like scripts/demo.sh (mirrored on 2 virtual CPUs), tiny: no C++ log, no private TF class, plain names."""
    code, out, err = run_reaped(tfpar_train_command() + [
        "--model=resnet18", "--width_multiplier=0.125", "--image_size=16", "--strategy=mirrored",
        "--virtual_cpus=2", "--batch_size=16", "--epochs=1", "--steps_per_epoch=3", "--validation_steps=1",
        f"--model_dir={tmp_path}"], 420, env=user_env())
    assert code == 0, err[-3000:]
    assert CPP_LOG.findall(out + err) == [], (out + err)[-3000:]
    assert sum(line.startswith("mirrored ×2: global batch 16") for line in out.splitlines()) == 1, out
    offered = precision.offer("mirrored")  # this machine's faster policy, if it has one
    hint = [line for line in out.splitlines() if line.startswith("precision float32 (the default")]
    assert hint == ([f"precision float32 (the default, as in Keras); {offered}"] if offered else []), out
    summary_text = (tmp_path / "summary.json").read_text()
    assert PRIVATE_CLASS.findall(out + err + summary_text) == [], out + summary_text
    summary = json.loads(summary_text)
    assert (summary["strategy"], summary["strategy_class"]) == ("mirrored ×2", "tf.distribute.MirroredStrategy")
    import tensorflow as tf

    texts = [tf.make_ndarray(v.tensor).item().decode() for f in os.listdir(tmp_path) if f.startswith("events.out")
             for e in tf.compat.v1.train.summary_iterator(str(tmp_path / f)) for v in e.summary.value if v.tag == "run"]
    assert len(texts) == 1 and texts[0].startswith("mirrored ×2: global batch 16"), texts
