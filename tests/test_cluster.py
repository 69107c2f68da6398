"""Cluster detection for every source, from environment fixtures, and every malformed TF_CONFIG.

TPUs cannot run here: the TPU tests cover the seams (which environment means
which TPU, the address the resolver gets), not a TPU connection.
"""

import json

import pytest

from tfpar.runtime import cluster

WORKERS = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]


def tf_config(task_type="worker", index=0, **cluster_spec):
    return json.dumps({"cluster": cluster_spec or {"worker": WORKERS}, "task": {"type": task_type, "index": index}})


def test_no_environment_is_one_local_process():
    info = cluster.detect(environ={}, path_exists=lambda p: False)
    assert (info.source, info.num_workers, info.is_chief, info.cluster_spec) == ("local", 1, True, {})


def test_tf_config_worker():
    info = cluster.detect(environ={"TF_CONFIG": tf_config("worker", 2)})
    assert (info.source, info.task_type, info.task_index, info.num_workers, info.is_chief) == (
        "tf_config", "worker", 2, 3, False)
    assert info.task_name == "worker-2"
    assert info.resolver().cluster_spec().as_dict() == {"worker": WORKERS}


def test_tf_config_with_chief_and_ps():
    raw = tf_config("chief", 0, chief=["h:1"], worker=["h:2", "h:3"], ps=["h:4"])
    info = cluster.detect(environ={"TF_CONFIG": raw})
    assert (info.num_workers, info.num_ps, info.is_chief) == (3, 1, True)
    worker0 = cluster.detect(environ={"TF_CONFIG": tf_config("worker", 0, chief=["h:1"], worker=["h:2"])})
    assert not worker0.is_chief  # with a chief, worker 0 is not it


def test_explicit_cluster_wins_over_the_environment():
    env = {"TF_CONFIG": tf_config("worker", 1), "SLURM_PROCID": "0"}
    spec = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    for given in (spec, json.dumps(spec)):
        info = cluster.detect(given, environ=env)
        assert (info.source, info.num_workers, info.cluster_spec) == ("explicit", 2, {"worker": ["a:1", "b:1"]})
    mine = cluster.ClusterInfo(num_workers=5, source="explicit")
    assert cluster.detect(mine, environ=env) is mine
    with pytest.raises(ValueError, match="cluster must be a ClusterInfo"):
        cluster.detect(42)


def test_kubeflow_tfjob_is_tf_config_inside_a_pod():
    env = {"TF_CONFIG": tf_config("worker", 1), "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    info = cluster.detect(environ=env)
    assert (info.source, info.task_index, info.num_workers) == ("kubeflow", 1, 3)


def test_tf_config_wins_over_slurm():
    env = {"TF_CONFIG": tf_config("worker", 0), "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    assert cluster.detect(environ=env).source == "tf_config"


def slurm_env(procid, tasks, nodelist, per_node, **extra):
    env = {"SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_JOB_ID": "77"}
    env.update(extra)
    return env


def test_slurm_one_task_per_node():
    info = cluster.detect(environ=slurm_env(2, 3, "node[07-08],alpha", "1(x3)"), path_exists=lambda p: False)
    # Hosts sorted, one port each, as SlurmClusterResolver lays them out.
    assert info.cluster_spec == {"worker": ["alpha:8888", "node07:8888", "node08:8888"]}
    assert (info.source, info.task_type, info.task_index, info.num_workers, info.visible_gpus) == (
        "slurm", "worker", 2, 3, None)


def test_slurm_one_task_per_gpu_shares_the_node_gpus():
    env = slurm_env(3, 4, "gpu[01-02]", "2(x2)", SLURM_GPUS_ON_NODE="4")
    info = cluster.detect(environ=env)
    assert info.cluster_spec["worker"] == ["gpu01:8888", "gpu01:8889", "gpu02:8888", "gpu02:8889"]
    assert (info.task_index, info.visible_gpus) == (3, "2,3")
    pinned = {}
    assert cluster.pin_gpus(info, pinned) and pinned == {"CUDA_VISIBLE_DEVICES": "2,3"}
    # When Slurm bound the GPUs itself (--gpus-per-task), tfpar leaves them alone.
    bound = cluster.detect(environ=dict(env, CUDA_VISIBLE_DEVICES="0"))
    assert bound.visible_gpus is None and not cluster.pin_gpus(bound, {"CUDA_VISIBLE_DEVICES": "0"})


def test_slurm_single_task_is_local_training():
    info = cluster.detect(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (info.source, info.num_workers, info.cluster_spec) == ("slurm", 1, {})


@pytest.mark.parametrize("env,match", [
    (slurm_env(0, 3, "n[1-2]", "1(x2)"), "2 node.*2 task.*step has 3"),
    (slurm_env(5, 2, "n[1-2]", "1(x2)"), "SLURM_PROCID=5 is out of range"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "no SLURM_STEP_NODELIST"),
    (slurm_env("x", 2, "n[1-2]", "1(x2)"), "SLURM_PROCID='x' is not an integer"),
    (slurm_env(0, 2, "n[1-2]", "two"), "Cannot read the Slurm node list"),
])
def test_malformed_slurm_environment(env, match):
    with pytest.raises(ValueError, match=match):
        cluster.detect(environ=env)


# Colab's TPU runtime today is a TPU VM (v5e/v6e: /dev/vfio/*; v2-8 was /dev/accel*).
COLAB_TPU_VM = {"COLAB_RELEASE_TAG": "release-colab_20261101-060000_RC00", "COLAB_GPU": ""}


@pytest.mark.parametrize("env,exists,expected", [
    ({"TPU_NAME": "my-v3-8"}, None, "my-v3-8"),
    (COLAB_TPU_VM, "/dev/vfio/0", "local"),
    (dict(COLAB_TPU_VM, COLAB_TPU_ADDR="10.0.0.2:8470"), "/dev/vfio/0", "local"),  # a stale old-runtime value
    ({"TPU_ACCELERATOR_TYPE": "v4-8"}, None, "local"),
    ({}, "/dev/accel0", "local"),
    ({}, "/dev/vfio/0", "local"),
])
def test_tpu_detection(env, exists, expected):
    info = cluster.detect(environ=env, path_exists=lambda p: p == exists)
    assert (info.source, info.tpu, info.num_workers) == ("tpu", expected, 1)
    assert cluster.tpu_address(cluster=info) == expected


def test_tpu_address_prefers_the_argument_and_explains_when_none():
    assert cluster.tpu_address("grpc://1.2.3.4:8470", environ={"TPU_NAME": "x"}) == "grpc://1.2.3.4:8470"
    with pytest.raises(ValueError, match="No TPU found"):
        cluster.tpu_address(environ={}, path_exists=lambda p: False)


def test_retired_colab_tpu_address_alone_is_no_tpu():
    """COLAB_TPU_ADDR (the retired TPU-node runtime, tensorflow/tensorflow#70827) without a TPU device is ignored."""
    info = cluster.detect(environ=dict(COLAB_TPU_VM, COLAB_TPU_ADDR="10.0.0.2:8470"), path_exists=lambda p: False)
    assert (info.source, info.tpu) == ("local", None)
    with pytest.raises(ValueError, match="Colab TPU runtime"):
        cluster.tpu_address(cluster=info)


def test_tpu_resolver_for_a_tpu_vm_is_local():
    """On a TPU VM (Colab's too) the resolver talks to the attached chips: no grpc master, no cluster."""
    info = cluster.detect(environ=COLAB_TPU_VM, path_exists=lambda p: p == "/dev/vfio/0")
    resolver = cluster.tpu_resolver(cluster=info)  # constructing it does not connect
    assert (resolver.master(), resolver.cluster_spec().as_dict()) == ("", {})


def test_tpu_resolver_gets_a_named_address():
    resolver = cluster.tpu_resolver("grpc://10.0.0.2:8470")
    assert resolver.master() == "grpc://10.0.0.2:8470"


@pytest.mark.parametrize("raw,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "no 'cluster' object"),
    (json.dumps({"cluster": {"worker": WORKERS}}), "no 'task' with 'type' and 'index'"),
    (json.dumps({"cluster": {"worker": WORKERS}, "task": {"type": "worker"}}), "no 'task' with 'type' and 'index'"),
    (tf_config("worker", 3), "index 3 is out of range for 'worker' \\(0..2\\)"),
    (tf_config("worker", -1), "index -1 is out of range"),
    (tf_config("worker", "0"), "index '0' is out of range"),
    (tf_config("worker", True), "index True is out of range"),
    (tf_config("worker", 0, worker=["h:1", "h:1"]), "address h:1 to both worker:0 and worker:1"),
    (tf_config("worker", 0, worker=["h:1"], ps=["h:1"]), "address h:1 to both worker:0 and ps"),
    (tf_config("worker", 0, worker=["h:1"], master=["h:2"]), "unknown task type 'master'.*accepted: chief, worker"),
    (tf_config("trainer", 0), "task type 'trainer' is unknown.*accepted"),
    (tf_config("ps", 0, worker=["h:1"]), "task type 'ps' is not in the cluster"),
    (tf_config("worker", 0, worker="h:1,h:2"), "must be a list of 'host:port' strings"),
])
def test_malformed_tf_config_gives_one_clear_error(raw, match):
    with pytest.raises(cluster.ClusterError, match=match) as err:
        cluster.detect(environ={"TF_CONFIG": raw})
    assert isinstance(err.value, ValueError) and str(err.value).count(".") >= 1 and "\n" not in str(err.value)


def test_auto_strategy_picks_tpu_on_a_colab_tpu_runtime_and_one_device_elsewhere():
    from tfpar.runtime import strategies

    on_tpu = cluster.detect(environ=COLAB_TPU_VM, path_exists=lambda p: p == "/dev/vfio/0")
    assert strategies._auto_name(on_tpu) == "tpu"
    colab_cpu = cluster.detect(environ=COLAB_TPU_VM, path_exists=lambda p: False)
    assert strategies._auto_name(colab_cpu) == "one_device"
