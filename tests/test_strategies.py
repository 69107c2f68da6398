"""Strategy factory: names, options, clear errors, auto choice; mirrored == one device (subprocess)."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tfpar.runtime import cluster, strategies
from tfpar.kerasfix import compat

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("name,kwargs,match", [
    ("mirror", {}, "Unknown strategy 'mirror'; choose one of: auto, one_device, mirrored, multi_worker"),
    ("one_device", {"all_reduce": "ring"}, "does not take option\\(s\\) all_reduce; it accepts: devices, virtual_cpus"),
    ("mirrored", {"communication_timeout": 5}, "does not take option.*communication_timeout"),
    ("multi_worker", {"num_packs": 2}, "does not take option.*num_packs.*accepts: all_reduce, bytes_per_pack"),
    ("mirrored", {"all_reduce": "ring"}, "all_reduce for mirrored must be one of \\['auto', 'nccl', 'hierarchical_copy'"),
    ("mirrored", {"all_reduce": "nccl"}, "all_reduce='nccl' needs GPUs"),
    ("mirrored", {"num_packs": 2}, "num_packs applies to all_reduce nccl or hierarchical_copy"),
    ("mirrored", {"all_reduce": "hierarchical_copy", "num_packs": -1}, "num_packs must be an int >= 0"),
    ("multi_worker", {"all_reduce": "hierarchical_copy"}, "all_reduce for multi_worker must be one of \\['auto', 'ring', 'nccl'\\]"),
    ("multi_worker", {"communication_timeout": -3}, "communication_timeout must be a positive number"),
    ("multi_worker", {"communication_timeout": "10"}, "communication_timeout must be a positive number"),
    ("multi_worker", {"bytes_per_pack": 1.5}, "bytes_per_pack must be an int >= 0"),
    ("one_device", {"devices": ["/cpu:0", "/cpu:1"]}, "one_device takes exactly one device"),
    ("auto", {"fp16_all_reduce": True}, "unexpected keyword"),
])
def test_wrong_names_and_options_say_what_is_accepted(name, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        strategies.create(name, **kwargs)


def test_communication_options_carry_the_settings():
    options = strategies.communication_options("ring", communication_timeout=30, bytes_per_pack=4 << 20)
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.RING
    assert options.timeout_seconds == 30.0 and options.bytes_per_pack == 4 << 20
    default = strategies.communication_options()
    assert default.implementation == tf.distribute.experimental.CommunicationImplementation.AUTO
    assert default.timeout_seconds is None and default.bytes_per_pack == 0


def test_one_device_and_mirrored_on_this_cpu():
    one = strategies.create("one_device")  # the host CPU: TF's default strategy, the faster equivalent
    assert one is tf.distribute.get_strategy() and one.num_replicas_in_sync == 1
    named = strategies.create("one_device", devices=["/cpu:0"])
    assert isinstance(named, tf.distribute.OneDeviceStrategy) and named.num_replicas_in_sync == 1
    with named.scope():  # inside another strategy's scope the default strategy is not to be had
        assert isinstance(strategies.create("one_device"), tf.distribute.OneDeviceStrategy)
    mirrored = strategies.create("mirrored", all_reduce="reduce_to_one_device")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert isinstance(mirrored.extended._cross_device_ops, tf.distribute.ReductionToOneDevice)


def test_multi_worker_single_process_applies_the_compat_fixes():
    strategy = strategies.create("multi_worker", cluster=cluster.ClusterInfo(), communication_timeout=60)
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended._communication_options.timeout_seconds == 60.0
    assert set(compat.applied()) == set(compat.NAMES)  # this Keras still has all three defects


def test_plain_names_and_public_classes_for_people():
    """What the start line and summary.json say: plain words, and never a private TF class."""
    made = {
        "one device (CPU)": strategies.create("one_device"),  # TF's _DefaultDistributionStrategy
        "one device (CPU:0)": strategies.create("one_device", devices=["/cpu:0"]),
        "mirrored ×1": strategies.create("mirrored", devices=["/cpu:0"]),
        "multi-worker ×1": strategies.create("multi_worker", cluster=cluster.ClusterInfo()),  # CollectiveAllReduce...
    }
    assert {name: strategies.describe(s) for name, s in made.items()} == {name: name for name in made}
    assert [strategies.public_class(s) for s in made.values()] == [
        "tf.distribute.Strategy", "tf.distribute.OneDeviceStrategy", "tf.distribute.MirroredStrategy",
        "tf.distribute.MultiWorkerMirroredStrategy"]
    assert "_DefaultDistributionStrategy" == type(made["one device (CPU)"]).__name__  # what used to be shown


@pytest.mark.parametrize("info,tpu,expected", [
    (cluster.ClusterInfo(source="tpu", tpu="local"), None, "tpu"),
    (cluster.ClusterInfo(), "grpc://1.2.3.4:8470", "tpu"),
    (cluster.ClusterInfo(num_workers=3, num_ps=1, cluster_spec={"worker": ["a:1"] * 3}), None, "parameter_server"),
    (cluster.ClusterInfo(num_workers=2, source="tf_config"), None, "multi_worker"),
    (cluster.ClusterInfo(), None, "one_device"),  # no GPUs here
])
def test_auto_choice(info, tpu, expected):
    assert strategies._auto_name(info, tpu) == expected


def test_auto_on_this_machine_is_one_device():
    chosen = strategies.create("auto", cluster=cluster.ClusterInfo())
    assert chosen is tf.distribute.get_strategy() and chosen.num_replicas_in_sync == 1  # no GPU: the CPU


@pytest.mark.slow
def test_mirrored_on_two_virtual_cpus_matches_one_device(tmp_path):
    """Same seed, same global batch of 32: 2 replicas of 16 give the weights of 1 replica of 32."""
    out = tmp_path / "eq.json"
    subprocess.run([sys.executable, os.path.join(HERE, "mirrored_fit.py"), "equivalence", str(out)],
                   check=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["replicas"] == 2
    assert result["max_abs_diff"] < 1e-5  # stated tolerance: float32 summation order only
    assert result["mirrored_loss"][-1] < result["mirrored_loss"][0]
