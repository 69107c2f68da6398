"""Kubernetes without an operator: the manifests in docs/kubernetes.md give every pod the right TF_CONFIG.

The manifests are read from the document itself, so the document cannot drift
from what ``tfpar.cluster.detect()`` reads. Each pod's environment is built as
Kubernetes would: the container's ``env`` (downward-API job-name label
resolved) plus ``JOB_COMPLETION_INDEX``.
"""

import json
import os
import re

import pytest
import yaml

from tfpar.run import cli
from tfpar.runtime import cluster

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "kubernetes.md")
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"


def manifests():
    """Every YAML document in the doc's ```yaml blocks, in order."""
    with open(DOC) as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), flags=re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block)]


def of_kind(kind):
    found = [m for m in manifests() if m["kind"] == kind]
    assert len(found) == 1, f"docs/kubernetes.md should have one {kind}"
    return found[0]


def pod_env(container, job_name, index):
    """The environment Kubernetes gives pod ``index`` of Indexed Job ``job_name``."""
    env = {"JOB_COMPLETION_INDEX": str(index), "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == JOB_NAME_LABEL, var
            env[var["name"]] = job_name
    return env


def check_indexed_job(job_spec, job_name, service):
    """Every pod of the Job sees the same cluster of ``<job>-<i>.<service>:port``, itself at index i."""
    assert job_spec["completionMode"] == "Indexed"
    count = job_spec["completions"]
    assert job_spec["parallelism"] == count  # MWMS needs every worker running at once
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    port = container["ports"][0]["containerPort"]
    expected = [f"{job_name}-{i}.{service}:{port}" for i in range(count)]
    for index in range(count):
        info = cluster.detect(environ=pod_env(container, job_name, index), path_exists=lambda p: False)
        assert (info.source, info.task_type, info.task_index, info.num_workers) == (
            "kubernetes", "worker", index, count)
        assert info.is_chief == (index == 0)
        tf_config = json.loads(info.tf_config())
        assert tf_config == {"cluster": {"worker": expected}, "task": {"type": "worker", "index": index}}
        assert cluster.from_tf_config(info.tf_config()).cluster_spec == {"worker": expected}
    # The command is a valid tfpar-train command line, and a multi-worker one.
    command = container["command"]
    assert os.path.basename(command[0]) == "tfpar-train"
    config = cli.config_from_flags(command)
    assert config.strategy == "multi_worker"
    assert config.model_dir.startswith(container["volumeMounts"][0]["mountPath"] + "/")  # backups on the shared volume
    # Exit code 2 (a user error) is permanent: the Job fails instead of retrying it.
    rules = job_spec["podFailurePolicy"]["rules"]
    fail_codes = [r["onExitCodes"]["values"] for r in rules if r["action"] == "FailJob" and "onExitCodes" in r]
    assert fail_codes == [[2]]
    assert all(r["onExitCodes"]["containerName"] == container["name"] for r in rules if "onExitCodes" in r)
    return rules


def test_indexed_job_and_headless_service_give_each_pod_its_tf_config():
    service, job = of_kind("Service"), of_kind("Job")
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS records
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    rules = check_indexed_job(job["spec"], job["metadata"]["name"], service["metadata"]["name"])
    ignored = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignored == [[75]]  # preempted with a backup: retried without counting against backoffLimit
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"] == cluster.K8S_PORT


def test_jobset_variant_gives_each_pod_its_tf_config():
    jobset = of_kind("JobSet")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1
    child_job = f"{jobset['metadata']['name']}-{replicated['name']}-0"  # JobSet's child Job name
    # JobSet's headless Service is named like the JobSet (no network.subdomain given).
    assert "subdomain" not in jobset["spec"]["network"]
    check_indexed_job(replicated["template"]["spec"], child_job, jobset["metadata"]["name"])
    assert replicated["template"]["spec"]["backoffLimit"] == 0  # any failure restarts the whole set
    (rule,) = jobset["spec"]["failurePolicy"]["rules"]
    assert rule == {"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}


def test_worker_hosts_list_and_ports():
    env = {"JOB_COMPLETION_INDEX": "2", "TFPAR_WORKER_HOSTS": "a.svc, b.svc:3000 ,c.svc", "TFPAR_PORT": "2345"}
    info = cluster.detect(environ=env)
    assert info.cluster_spec == {"worker": ["a.svc:2345", "b.svc:3000", "c.svc:2345"]}
    assert (info.task_index, info.num_workers, info.is_chief, info.source) == (2, 3, False, "kubernetes")
    one = cluster.detect(environ={"JOB_COMPLETION_INDEX": "0", "TFPAR_WORKER_HOSTS": "solo"})
    assert (one.num_workers, one.cluster_spec, one.source) == (1, {}, "kubernetes")


def test_tf_config_wins_and_a_bare_index_is_not_a_cluster():
    raw = json.dumps({"cluster": {"worker": ["x:1", "y:1"]}, "task": {"type": "worker", "index": 1}})
    env = {"TF_CONFIG": raw, "JOB_COMPLETION_INDEX": "0", "TFPAR_WORKER_HOSTS": "a,b,c"}
    assert cluster.detect(environ=env).cluster_spec == {"worker": ["x:1", "y:1"]}
    assert cluster.detect(environ={"JOB_COMPLETION_INDEX": "3"}, path_exists=lambda p: False).source == "local"


@pytest.mark.parametrize("env,match", [
    ({"JOB_COMPLETION_INDEX": "4", "TFPAR_WORKER_HOSTS": "a,b"}, r"JOB_COMPLETION_INDEX=4 is out of range for 2"),
    ({"JOB_COMPLETION_INDEX": "x", "TFPAR_WORKER_HOSTS": "a,b"}, r"JOB_COMPLETION_INDEX='x' must be an integer"),
    ({"JOB_COMPLETION_INDEX": "0", "TFPAR_WORKER_HOSTS": "a,,b"}, r"has an empty entry"),
    ({"JOB_COMPLETION_INDEX": "0", "TFPAR_WORKER_HOSTS": "a,a"}, r"lists an address twice"),
    ({"JOB_COMPLETION_INDEX": "0", "TFPAR_JOB_NAME": "j", "TFPAR_NUM_WORKERS": "2"}, r"TFPAR_SERVICE"),
    ({"JOB_COMPLETION_INDEX": "0", "TFPAR_JOB_NAME": "j", "TFPAR_SERVICE": "s", "TFPAR_NUM_WORKERS": "0"},
     r"TFPAR_NUM_WORKERS='0' must be an integer >= 1"),
    ({"JOB_COMPLETION_INDEX": "0", "TFPAR_WORKER_HOSTS": "a,b", "TFPAR_PORT": "p"}, r"TFPAR_PORT='p'"),
])
def test_bad_kubernetes_environment_is_one_sentence(env, match):
    with pytest.raises(cluster.ClusterError, match=match):
        cluster.detect(environ=env)
