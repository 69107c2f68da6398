"""tfpar: distributed TensorFlow / Keras 3 training that works on current releases."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tfpar" / "__init__.py").read_text()).group(1)

# The versions tfpar is tested with. compat.py gates its fixes on these too.
INSTALL_REQUIRES = [
    "tensorflow==2.21.*",
    "keras==3.15.*",
    "tensorboard>=2.21",
    "tensorboard-plugin-profile>=2.20",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # ships the real 8x8 digits images used offline
    "pillow>=10",  # writes image fixtures in tests and the sharding chart's PNG
]

RAY = "ray[train]>=2.60,<3"  # Ray Train's TensorflowTrainer; Linux wheels for Python 3.10-3.13

setup(
    name="tfpar",
    version=VERSION,
    description="Multi-device, multi-worker, TPU and DTensor training for Keras 3 on TensorFlow.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["tfpar", "tfpar.models"],
    package_dir={"tfpar": "tfpar", "tfpar.models": "models"},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # pyyaml: tests read docs/kubernetes.md; ray: tests/test_ray.py runs in CI too
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pyyaml>=6", RAY],
        "ray": [RAY],  # tfpar.ray, tfpar-train --launcher=ray
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "matplotlib>=3.8", "build", "twine"],
    },
    entry_points={
        "console_scripts": [
            "tfpar-train=tfpar.cli:run_main",
            "tfpar-launch=tfpar.launcher:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
