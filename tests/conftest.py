"""Shared fixtures. Tests run on the CPU; TF's C++ logs are kept quiet."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# --autotune's cache (and jit_compile=auto, which reads it) must not see the developer's own choices.
os.environ["TFPAR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"tfpar-test-cache-{os.getpid()}")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends with the float32 policy and a fresh Keras session."""
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def netns_cluster():
    """``make(count)`` -> a ``tests/netns.Cluster`` of hosts as network namespaces on 198.18.0.0/24.

    Skips where namespaces cannot be made (not root, no iproute2). Every
    cluster made is removed afterwards, pass or fail; leftovers of a crashed
    earlier run are removed first.
    """
    import netns

    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    netns.remove_stale()
    made = []

    def make(count):
        made.append(netns.Cluster(count))
        return made[-1]

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
