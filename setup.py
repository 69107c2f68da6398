"""tfpar: distributed TensorFlow / Keras 3 training that works on current releases."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tfpar" / "core" / "versions.py").read_text()).group(1)

# The supported range lives in tfpar/core/versions.py (CI tests both ends, .ci/run).
# TensorFlow is not a plain requirement: tensorflow, tensorflow-tpu (TPU VMs)
# and tensorflow[and-cuda] are different distributions of the same package,
# so the extras below pick one and `pip install tfpar` beside an installed
# TensorFlow (a TPU VM's tensorflow-tpu, Colab's tensorflow) keeps that one.
# tfpar refuses to start, naming the versions, when none is in range.
VERSIONS_PY = (HERE / "tfpar" / "core" / "versions.py").read_text()


def _requirement(name):
    """versions.py's ``NAME = ("oldest", "newest")`` as a pip specifier (as versions.requirement does)."""
    oldest, newest = re.search(rf'^{name} = \("([\d.]+)", "([\d.]+)"\)', VERSIONS_PY, re.M).groups()
    major, minor = newest.split(".")
    return f">={oldest},<{major}.{int(minor) + 1}"


TENSORFLOW = _requirement("TENSORFLOW")  # >=2.20,<2.22
KERAS = _requirement("KERAS")  # >=3.10,<3.16

INSTALL_REQUIRES = [
    f"keras{KERAS}",
    "tensorboard>=2.20",
    "tensorboard-plugin-profile>=2.20",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # ships the real 8x8 digits images used offline
    "pillow>=10",  # writes image fixtures in tests and the sharding chart's PNG
]

KERAS_HUB = "keras-hub>=0.25"  # 0.25 is the newest for Keras 3.10, the oldest supported pair
RAY = "ray[train]>=2.60,<3"  # Ray Train's TensorflowTrainer; Linux wheels for Python 3.10-3.13

setup(
    name="tfpar",
    version=VERSION,
    description="Multi-device, multi-worker, TPU and DTensor training for Keras 3 on TensorFlow.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["tfpar", "tfpar.core", "tfpar.step", "tfpar.kerasfix", "tfpar.runtime", "tfpar.parallel",
              "tfpar.parallel.pipeline", "tfpar.parallel.sharding", "tfpar.run", "tfpar.run.hooks", "tfpar.models"],
    package_dir={"tfpar": "tfpar", "tfpar.models": "models"},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cpu": [f"tensorflow{TENSORFLOW}"],
        "and-cuda": [f"tensorflow[and-cuda]{TENSORFLOW}"],
        "tpu": [f"tensorflow-tpu{TENSORFLOW}"],
        # pyyaml: tests read docs/kubernetes.md; ray: tests/test_ray.py runs in CI too; nbclient...: the notebook test;
        # keras-hub: transformer backbones built from tiny configs (nothing downloaded). It pulls in `tensorflow`
        # through tensorflow-text, so install the test extras beside [cpu], not beside tensorflow-cpu.
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pyyaml>=6",
            RAY,
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            KERAS_HUB,
        ],
        "ray": [RAY],  # tfpar.ray, tfpar-train --launcher=ray
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.8", "build", "twine"],
        # scripts/benchmark.py --only keras3_jax_vs_tfpar (Keras 3 on JAX beside tfpar) and --only autotune (Gemma)
        "bench": ["jax[cpu]", KERAS_HUB],
    },
    entry_points={
        "console_scripts": [
            "tfpar-train=tfpar.run.cli:run_main",
            "tfpar-launch=tfpar.runtime.launcher:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
