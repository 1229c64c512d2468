"""The pod runner stands in for a kubelet: real Jobs, driven by the real Job controller, run
their pods' commands as local processes and finish Complete or Failed."""

import os
import sys
import textwrap

import pytest
from kubernetes import client

pytestmark = pytest.mark.cluster


def job_yaml(name: str, command: list[str], *, backoff: int = 0, extra_container: str = "",
             extra_pod: str = "") -> str:
    container = textwrap.indent(extra_container.strip("\n"), " " * 8) if extra_container else ""
    pod = textwrap.indent(extra_pod.strip("\n"), " " * 6) if extra_pod else ""
    return f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  backoffLimit: {backoff}
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: ignored.example/unused:latest
        command: {command}
{container}
{pod}
"""


def job_pods(k8s, namespace: str, job: str) -> list:
    with k8s.api() as api:
        return client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def terminated(pod):
    return pod.status.container_statuses[0].state.terminated


def test_job_completes(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-",
                input=job_yaml("hello", ["python", "-c", "import sys; print(1); print(sys.prefix)"]))
    assert k8s.wait_job(namespace, "hello") == "Complete"
    [pod] = job_pods(k8s, namespace, "hello")
    assert pod.spec.node_name == "deltafleet-test-node"
    assert pod.status.phase == "Succeeded"
    assert terminated(pod).exit_code == 0 and terminated(pod).reason == "Completed"
    out = k8s.pod_log(namespace, pod.metadata.name).splitlines()
    # `python` resolved to the project's venv (the one running the tests): first on the pod's PATH.
    assert out[0] == "1" and os.path.samefile(out[1], sys.prefix)
    # kubectl logs goes through the API server to the runner's kubelet-like log endpoint.
    assert k8s.kubectl("-n", namespace, "logs", pod.metadata.name).stdout.splitlines() == out
    assert k8s.kubectl("-n", namespace, "logs", "job/hello", "--tail=1").stdout.splitlines() == out[1:]


def test_kubectl_logs_follows_a_running_pod_until_it_ends(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
        "talker", ["sh", "-c", "echo first; sleep 3; echo second"]))
    k8s.wait_for(lambda: k8s.kubectl("-n", namespace, "logs", "job/talker", check=False).stdout == "first\n",
                 "the first line")
    # Returns only once the container has ended, with everything it printed.
    assert k8s.kubectl("-n", namespace, "logs", "-f", "job/talker").stdout == "first\nsecond\n"


def test_job_fails_with_exit_code_and_termination_message(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
        "boom", ["sh", "-c", "echo starting; echo 'bad input: x' > /dev/termination-log; exit 3"]))
    assert k8s.wait_job(namespace, "boom") == "Failed"
    [pod] = job_pods(k8s, namespace, "boom")
    assert pod.status.phase == "Failed"
    t = terminated(pod)
    assert (t.exit_code, t.reason, t.message) == (3, "Error", "bad input: x\n")
    assert k8s.pod_log(namespace, pod.metadata.name) == "starting\n"


def test_termination_message_falls_back_to_logs_on_error(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
        "fallback", ["sh", "-c", "echo one; echo two >&2; exit 1"],
        extra_container="terminationMessagePolicy: FallbackToLogsOnError"))
    assert k8s.wait_job(namespace, "fallback") == "Failed"
    [pod] = job_pods(k8s, namespace, "fallback")
    assert (terminated(pod).exit_code, terminated(pod).message) == (1, "one\ntwo")


def test_backoff_retries_create_new_pods(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml("retry", ["false"], backoff=1))
    assert k8s.wait_job(namespace, "retry") == "Failed"
    pods = job_pods(k8s, namespace, "retry")
    assert len(pods) == 2 and all(terminated(p).exit_code == 1 for p in pods)


def test_mounts_env_and_termination_path_are_remapped(k8s, namespace, tmp_path):
    (tmp_path / "input.txt").write_text("from the host")
    k8s.kubectl("-n", namespace, "create", "configmap", "settings", "--from-literal=mode=fast")
    k8s.kubectl("-n", namespace, "create", "secret", "generic", "creds", "--from-literal=token=s3cret")
    script = (
        "import os, pathlib as p; "
        "print(p.Path('/host/input.txt').read_text()); "
        "print(p.Path('/etc/settings/mode').read_text()); "
        "print(os.environ['TOKEN'], os.environ['POD'], os.environ['NS'] == os.environ['EXPECT_NS']); "
        "print(os.environ['OUT']); "
        "p.Path(os.environ['OUT']).mkdir(); p.Path(os.environ['OUT'], 'result.json').write_text('{}'); "
        "p.Path('/msg/termination').write_text('all done')"
    )
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
        "mounts", ["python", "-c", script],
        extra_container=f"""
terminationMessagePath: /msg/termination
env:
- {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: creds, key: token}}}}}}
- {{name: POD, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
- {{name: NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
- {{name: EXPECT_NS, value: {namespace}}}
- {{name: OUT, value: /scratch/out}}
volumeMounts:
- {{name: host, mountPath: /host}}
- {{name: settings, mountPath: /etc/settings}}
- {{name: scratch, mountPath: /scratch}}
""",
        extra_pod=f"""
volumes:
- {{name: host, hostPath: {{path: {tmp_path}}}}}
- {{name: settings, configMap: {{name: settings}}}}
- {{name: scratch, emptyDir: {{}}}}
"""))
    assert k8s.wait_job(namespace, "mounts") == "Complete", k8s.pod_log(namespace, job_pods(k8s, namespace, "mounts")[0].metadata.name)
    [pod] = job_pods(k8s, namespace, "mounts")
    lines = k8s.pod_log(namespace, pod.metadata.name).splitlines()
    assert lines[:3] == ["from the host", "fast", f"s3cret {pod.metadata.name} True"]
    scratch = lines[3]
    assert scratch.endswith("/volumes/scratch/out") and os.path.exists(os.path.join(scratch, "result.json"))
    # The termination message path was remapped; the text written there is returned verbatim.
    assert terminated(pod).message == "all done"


def test_deleting_a_job_deletes_its_pods_and_kills_their_processes(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml("sleeper", ["sleep", "300"]))

    def running_pid():
        pods = job_pods(k8s, namespace, "sleeper")
        if pods and pods[0].status.phase == "Running":
            return int(pods[0].status.container_statuses[0].container_id.removeprefix("local://"))

    pid = k8s.wait_for(running_pid, "the sleeper pod to run")
    os.kill(pid, 0)  # the process is alive
    k8s.kubectl("-n", namespace, "delete", "job", "sleeper", "--cascade=background")
    k8s.wait_for(lambda: not job_pods(k8s, namespace, "sleeper"), "the garbage collector to delete the pod")
    k8s.wait_for(lambda: not _alive(pid), f"process {pid} to be killed")


def test_pods_not_for_the_runner_stay_pending(k8s, namespace):
    with k8s.api() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="plain"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x", command=["true"])])))
        # Give the runner a chance to (wrongly) pick it up, while a Job pod in the same
        # namespace is run: once that finishes, the runner has seen both.
        k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml("marker", ["true"]))
        assert k8s.wait_job(namespace, "marker") == "Complete"
        plain = core.read_namespaced_pod("plain", namespace)
        assert plain.status.phase == "Pending" and not plain.spec.node_name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose: it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_missing_secret_keeps_the_pod_waiting_until_it_exists(k8s, namespace):
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
        "waits", ["sh", "-c", "echo $KEY"],
        extra_container="env:\n- {name: KEY, valueFrom: {secretKeyRef: {name: later, key: k}}}"))

    def waiting_reason():
        pods = job_pods(k8s, namespace, "waits")
        statuses = pods[0].status.container_statuses if pods else None
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    assert k8s.wait_for(waiting_reason, "the pod to wait for its Secret") == "CreateContainerConfigError"
    k8s.kubectl("-n", namespace, "create", "secret", "generic", "later", "--from-literal=k=arrived")
    assert k8s.wait_job(namespace, "waits") == "Complete"
    assert k8s.kubectl("-n", namespace, "logs", "job/waits").stdout == "arrived\n"


def test_a_failed_token_request_keeps_the_pod_creating_until_it_succeeds(k8s, namespace):
    """The kubelet retries a volume it cannot set up (FailedMount) instead of failing the pod:
    here the pod's ServiceAccount is gone when the runner asks for its token, then comes back."""
    with k8s.api() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="later")))
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="token"),
            spec=client.V1PodSpec(service_account_name="later", restart_policy="Never", containers=[
                client.V1Container(name="c", image="x", command=["sh", "-c", "test -s $T/token && echo has-token"],
                                   env=[client.V1EnvVar(name="T", value="/var/run/secrets/kubernetes.io/serviceaccount")])])))
        # Admitted while the ServiceAccount existed; not the runner's until annotated.
        core.delete_namespaced_service_account("later", namespace)
        core.patch_namespaced_pod("token", namespace, {"metadata": {"annotations": {"tests.deltafleet.dev/run-locally": "true"}}})

        def waiting():
            statuses = core.read_namespaced_pod("token", namespace).status.container_statuses
            return statuses and statuses[0].state.waiting and statuses[0].state.waiting

        w = k8s.wait_for(waiting, "the pod to wait for its token")
        assert w.reason == "ContainerCreating" and "404" in w.message, w
        core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="later")))
        k8s.wait_for(lambda: core.read_namespaced_pod("token", namespace).status.phase == "Succeeded", "the pod to run")
    assert k8s.pod_log(namespace, "token") == "has-token\n"


def test_on_failure_restarts_the_container_in_place(k8s, namespace):
    manifest = job_yaml(
        "flaky", ["sh", "-c", "if [ -f /work/tried ]; then echo ok; else touch /work/tried; exit 1; fi"],
        extra_container="volumeMounts: [{name: work, mountPath: /work}]",
        extra_pod="volumes: [{name: work, emptyDir: {}}]",
        backoff=3).replace("restartPolicy: Never", "restartPolicy: OnFailure")
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=manifest)
    assert k8s.wait_job(namespace, "flaky") == "Complete"
    [pod] = job_pods(k8s, namespace, "flaky")
    status = pod.status.container_statuses[0]
    assert status.restart_count == 1 and status.last_state.terminated.exit_code == 1
    assert terminated(pod).exit_code == 0


def test_pods_share_a_persistent_volume_claim(k8s, namespace):
    for name, script in [("writer", "echo hello > /data/greeting"), ("reader", "cat /data/greeting")]:
        k8s.kubectl("-n", namespace, "apply", "-f", "-", input=job_yaml(
            name, ["sh", "-c", script],
            extra_container="volumeMounts: [{name: store, mountPath: /data}]",
            extra_pod="volumes: [{name: store, persistentVolumeClaim: {claimName: results}}]"))
        assert k8s.wait_job(namespace, name) == "Complete"
    assert k8s.kubectl("-n", namespace, "logs", "job/reader").stdout == "hello\n"


def test_what_cannot_run_locally_fails_at_once(k8s, namespace):
    manifest = job_yaml("noentry", ["unused"]).replace("        command: ['unused']\n", "")
    assert "command" not in manifest
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=manifest)
    assert k8s.wait_job(namespace, "noentry") == "Failed"
    [pod] = job_pods(k8s, namespace, "noentry")
    t = terminated(pod)
    assert (t.exit_code, t.reason) == (128, "StartError") and "no command" in t.message
