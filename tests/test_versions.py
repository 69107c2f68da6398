"""The supported TensorFlow/Keras range: one sentence and exit 2 outside it, and an install shape
that never pulls a second TensorFlow (setup.py extras)."""

import importlib.metadata
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

from tfpar.core import versions

REPO = pathlib.Path(__file__).resolve().parent.parent
RANGE = "TensorFlow 2.20-2.21 (tensorflow, tensorflow-cpu or tensorflow-tpu) with Keras 3.10-3.15"


@pytest.mark.parametrize("found", [
    {"tensorflow": "2.20.0", "keras": "3.10.0"},
    {"tensorflow": "2.21.0", "keras": "3.15.1"},
    {"tensorflow-tpu": "2.20.0", "keras": "3.12.4"},
    {"tensorflow-cpu": "2.21.0", "keras": "3.13.2"},
])
def test_supported_pairs_pass(found):
    assert versions.problem(found) is None


@pytest.mark.parametrize("found,importable,starts", [
    ({}, False, "No TensorFlow is installed, but tfpar"),
    ({"keras": "3.15.1"}, False, "No TensorFlow is installed, but tfpar"),
    ({"tensorflow": "2.19.1", "keras": "3.10.0"}, None, "tensorflow 2.19.1 is installed, but tfpar"),
    ({"tensorflow": "2.22.0", "keras": "3.15.1"}, None, "tensorflow 2.22.0 is installed, but tfpar"),
    ({"tensorflow-tpu": "2.20.0", "keras": "3.9.2"}, None, "tensorflow-tpu 2.20.0 with Keras 3.9.2 is installed"),
    ({"tensorflow": "2.21.0", "keras": "3.16.0"}, None, "tensorflow 2.21.0 with Keras 3.16.0 is installed"),
    ({"tensorflow": "2.21.0"}, None, "tensorflow 2.21.0 is installed without Keras"),
    ({"tensorflow": "2.21.0", "tensorflow-tpu": "2.20.0", "keras": "3.15.1"}, None,
     "Several TensorFlow distributions are installed (tensorflow 2.21.0, tensorflow-tpu 2.20.0)"),
])
def test_unsupported_installs_get_one_sentence_naming_both_versions(found, importable, starts):
    message = versions.problem(found, tensorflow_importable=importable)
    assert message.startswith(starts), message
    assert RANGE in message and message.endswith(".") and "\n" not in message
    assert message.count(". ") == 0, message  # one sentence


def test_tensorflow_without_metadata_but_importable_is_accepted():
    """A TensorFlow built from source has no distribution metadata; Keras still has to be in range."""
    assert versions.problem({"keras": "3.12.0"}, tensorflow_importable=True) is None
    assert "Keras 3.9.0 is installed" in versions.problem({"keras": "3.9.0"}, tensorflow_importable=True)


def test_installed_reads_the_running_versions():
    import keras
    import tensorflow as tf

    found = versions.installed()
    assert found["keras"] == keras.__version__
    assert tf.__version__ in {v for k, v in found.items() if k != "keras"}
    assert versions.problem() is None


def test_require_exits_2_for_commands_and_raises_for_imports(capsys):
    bad = {"tensorflow": "2.19.1", "keras": "3.10.0"}
    with pytest.raises(SystemExit) as exit_info:
        versions.require(environ={}, argv=["/venv/bin/tfpar-train", "--epochs=1"], found=bad)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("tfpar: tensorflow 2.19.1 is installed, but tfpar")
    with pytest.raises(versions.UnsupportedVersions, match="tensorflow 2.19.1 is installed"):
        versions.require(environ={}, argv=["python"], found=bad)
    assert versions.require(environ={versions.SKIP_ENV: "1"}, argv=["python"], found=bad) is None


def test_cli_with_two_tensorflows_exits_2_in_one_line_before_importing_tensorflow(tmp_path):
    """A second TensorFlow distribution beside the real one (as tensorflow + tensorflow-tpu would be)."""
    info = tmp_path / "tensorflow_tpu-2.20.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow-tpu\nVersion: 2.20.0\n")
    script = pathlib.Path(sys.executable).parent / "tfpar-train"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tfpar.cli"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(command + ["--epochs=1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("tfpar: Several TensorFlow distributions are installed (")
    assert "tensorflow-tpu 2.20.0" in proc.stderr


def test_fresh_environment_without_tensorflow_refuses_to_start(tmp_path):
    """A virtualenv with nothing installed: ``python -m tfpar.cli`` names what to install, exit 2."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "tfpar.cli", "--epochs=1"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"tfpar: No TensorFlow is installed, but tfpar {versions._own_version()} "
                                   f"supports {RANGE}; install one with pip install 'tfpar[cpu]', "
                                   f"'tfpar[and-cuda]' (NVIDIA GPUs) or 'tfpar[tpu]' (TPU VMs).")
    proc = subprocess.run([str(python), "-c", "import tfpar"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 1 and "tfpar.core.versions.UnsupportedVersions: No TensorFlow is installed" in proc.stderr


@pytest.fixture(scope="module")
def setup_arguments():
    import setuptools

    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return captured


TENSORFLOW_NAME = re.compile(r"^(tensorflow|tensorflow-cpu|tensorflow-tpu|tf-nightly)(\[|[<>=!~]|$)")


def test_plain_install_requires_no_tensorflow_and_each_extra_one(setup_arguments):
    assert not [r for r in setup_arguments["install_requires"] if TENSORFLOW_NAME.match(r)]
    assert f"keras{versions.requirement(versions.KERAS)}" in setup_arguments["install_requires"]
    extras = setup_arguments["extras_require"]
    spec = versions.requirement(versions.TENSORFLOW)
    assert spec == ">=2.20,<2.22"
    assert extras["cpu"] == [f"tensorflow{spec}"]
    assert extras["and-cuda"] == [f"tensorflow[and-cuda]{spec}"]
    assert extras["tpu"] == [f"tensorflow-tpu{spec}"]
    assert {"nbclient", "nbformat", "ipykernel"} <= {re.split(r"[<>=]", r)[0] for r in extras["test"]}


def test_every_package_directory_is_packaged(setup_arguments):
    packages = set(setup_arguments["packages"])
    on_disk = {"tfpar." + ".".join(p.parent.relative_to(REPO / "tfpar").parts) if p.parent != REPO / "tfpar"
               else "tfpar" for p in (REPO / "tfpar").rglob("__init__.py")}
    assert on_disk <= packages, f"setup.py misses {sorted(on_disk - packages)}"
    assert "tfpar.models" in packages and setup_arguments["package_dir"]["tfpar.models"] == "models"


def test_installed_distribution_metadata_has_the_extras():
    """The editable install this suite runs from was made from this setup.py."""
    requires = importlib.metadata.requires("tfpar") or []
    assert any(r.startswith("tensorflow-tpu") and 'extra == "tpu"' in r for r in requires), requires
    assert not any(TENSORFLOW_NAME.match(r) and "extra ==" not in r for r in requires), requires
