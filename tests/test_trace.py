"""tfpar.core.trace: a profiler trace boiled down to compute / all-reduce / exposed time per step.

A real trace of a small Keras fit is taken in this process; the multi-worker
trace (with all-reduce time) is checked in test_multi_worker.py.
"""

import numpy as np
import pytest

from tfpar.core import trace


@pytest.fixture(scope="module")
def fit_trace(tmp_path_factory):
    import keras

    log_dir = tmp_path_factory.mktemp("tb")
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(rng.normal(size=(160, 64)).astype("float32"), rng.integers(0, 10, 160), batch_size=32, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(log_dir), profile_batch=(2, 4))])
    paths = trace.find(str(log_dir))
    assert len(paths) == 1, paths
    return paths[0]


def test_a_fit_trace_gives_its_steps_and_their_ops(fit_trace):
    b = trace.step_breakdown(fit_trace)
    assert b["steps"] == 3
    assert 0 < b["compute_ms"] <= b["step_ms"]
    assert b["exposed_ms"] == pytest.approx(b["step_ms"] - b["compute_ms"], abs=0.11)
    assert b["all_reduce_ms"] == 0 and b["overlap_ms"] == 0  # one device: nothing to all-reduce
    assert "MatMul" in " ".join(op for op, _ in b["top_ops"])
    assert b["busy_ms_by_thread"]["tf_Compute"] == b["compute_ms"]
    assert trace.describe(b).startswith("3 steps: ")


def test_the_command_prints_each_trace_and_refuses_an_empty_dir(fit_trace, tmp_path, capsys):
    assert trace.main([fit_trace]) == 0
    assert "ms/step = compute" in capsys.readouterr().out
    assert trace.main([str(tmp_path)]) == 2
    assert "no .xplane.pb under" in capsys.readouterr().err


def test_a_trace_without_training_steps_is_refused(tmp_path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.planes.add(name="/host:CPU")
    path = tmp_path / "empty.xplane.pb"
    path.write_bytes(space.SerializeToString())
    with pytest.raises(ValueError, match="holds no training step"):
        trace.step_breakdown(str(path))


def test_interval_arithmetic():
    merged = trace._merge([(5, 7), (0, 2), (1, 3), (7, 8)])
    assert merged == [[0, 3], [5, 8]] and trace._length(merged) == 6
    assert trace._intersection(merged, [[2, 6]]) == 2
