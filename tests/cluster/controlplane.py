"""A real Kubernetes control plane for the tests: etcd, kube-apiserver (RBAC, service-account
tokens) and kube-controller-manager (Job controller, garbage collector, service-account and
namespace controllers, …), and either

- node=True: kube-scheduler and one real node (node.py: containerd, kubelet, kube-proxy, bridge
  CNI, CoreDNS) in its own namespaces, joined to the host by a veth pair; the API server
  listens on the host's end of it; or
- node=False: no node at all, on loopback: pods are admitted but never run (the skew check's
  older control plane, whose tests need only the API).

Everything lives in one temp folder and on free ports; `stop()` ends every process it started,
removes what the node created and the folder."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ports import free_port

from .binaries import kube_version, require_binaries
from .netns import _die_with_parent

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 90  # generous for a loaded 2-core CI machine; ~10 s when idle


class CommandError(subprocess.CalledProcessError):
    """A failed kubectl/helm call whose message carries the tool's own output."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"stdout: {(self.stdout or '').strip()[-2000:]}\nstderr: {(self.stderr or '').strip()[-2000:]}"
        )


class PortTaken(RuntimeError):
    pass


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict, name: str) -> Path:
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "deltafleet-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": "deltafleet-test", "user": name}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


class Process:
    """One component: its own session (so a kill reaches its children) and a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self._log_fh = open(log, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, preexec_fn=_die_with_parent,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        # The session may hold children that outlived their leader: end them too.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_fh.close()

    def tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


class Cluster:
    def __init__(self, workdir: Path | None = None, keep_workdir: bool = False, skew: bool = False,
                 node: bool = False, project_images: bool = True):
        """skew: run the control plane (etcd, API server, controllers, kubectl) of the skew
        check's older Kubernetes minor; helm is the pinned current one either way.
        node: a real node (and the scheduler), else a control plane whose pods never run (the
        skew check's API-only cluster); project_images: the node holds the images
        images/build.py built too (not only its own)."""
        self.bin_dir = require_binaries(skew)
        self.helm_bin = require_binaries() / "helm"
        self.version = kube_version(skew)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="deltafleet-k8s-"))
        self.keep_workdir = keep_workdir
        self.processes: list[Process] = []
        from .certs import PKI  # cryptography: only imported when a cluster is started

        self.node = None
        if node:
            from .node import Addresses, Node

            self.addresses = Addresses.free()
            self.host_ip = self.addresses.host_ip
            self.pki = PKI(self.workdir / "pki", ips=("127.0.0.1", self.host_ip, self.addresses.kubernetes_ip))
            self.node = Node(self, self.addresses, project_images)
            self.node_name = self.node.name
        else:
            self.host_ip = "127.0.0.1"
            self.pki = PKI(self.workdir / "pki")
            self.node_name = None
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self._cm_kubeconfig = self.workdir / "controller-manager.kubeconfig"

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.server = f"https://{self.host_ip}:{self.port}"
        write_kubeconfig(
            self.kubeconfig, self.server, self.pki.ca_crt,
            {"client-certificate": str(self.pki.admin_crt), "client-key": str(self.pki.admin_key)},
            "admin",
        )
        write_kubeconfig(
            self._cm_kubeconfig, self.server, self.pki.ca_crt,
            {"client-certificate": str(self.pki.controller_manager_crt),
             "client-key": str(self.pki.controller_manager_key)},
            "controller-manager",
        )

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Cluster":
        t0 = time.monotonic()
        try:
            for attempt in range(3):
                self._pick_ports()
                try:
                    self._start_components()
                    break
                except PortTaken:
                    # A free port was taken between our probe and the component's bind.
                    self._stop_processes()
                    shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
                    if attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _start_components(self) -> None:
        if self.node is not None:
            self.node.ns_start()  # the API server listens on the host's end of the node's link
        self._start_etcd()
        self._start_apiserver()
        self._wait(self._apiserver_ready, "kube-apiserver /readyz")
        self._start_controller_manager()
        if self.node is not None:
            self._start_scheduler()
            self.node.start()
        # Pods need their namespace's `default` ServiceAccount (the admission plugin
        # rejects them otherwise): its existence shows the controllers are working.
        self._wait(self._default_sa_exists, "ServiceAccount default/default (controller-manager)")
        if self.node is not None:
            self._wait(self._node_registered, f"the Node {self.node_name}")
            self._wait(self.node.ready, f"the Node {self.node_name} Ready")
            self.kubectl("apply", "-f", "-", input=self.node.coredns_manifest())
            self._wait(self.node.dns_ready, "CoreDNS (kube-system/kube-dns) ready")
            self._wait(self.node.dns_answers, "the kube-dns Service to answer (CoreDNS through kube-proxy)")

    def stop(self) -> None:
        # A second Ctrl-C or SIGTERM (timeout(1) forwards one) must not cut the cleanup short:
        # the node's namespaces, cgroups and sysctls are undone only here.
        import threading

        main = threading.current_thread() is threading.main_thread()
        saved = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)] if main else []
        try:
            self._stop_processes()
            if self.node is not None:
                self.node.stop()
            if self._own_workdir and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            for s, handler in saved:
                signal.signal(s, handler)

    def _stop_processes(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.processes]

    # -- what tests use --------------------------------------------------------------------
    def kubectl(self, *args, kubeconfig: Path | str | None = None, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *map(str, args)]
        return self._run(argv, input=input, check=check)

    def helm(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        home = self.workdir / "helm"
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig),
                   HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
                   HELM_DATA_HOME=str(home / "data"))
        return self._run([str(self.helm_bin), *map(str, args)], env=env, check=check)

    def api(self, kubeconfig: Path | str | None = None):
        """A fresh kubernetes.client.ApiClient (admin unless another kubeconfig is given)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def sa_kubeconfig(self, namespace: str, name: str, expiration_s: int = 3600) -> Path:
        """A kubeconfig that acts as ServiceAccount `namespace/name`, with a token from the
        TokenRequest API: exactly that account's RBAC, nothing more."""
        from kubernetes import client

        with self.api() as api:
            tr = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace,
                client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                    audiences=[], expiration_seconds=expiration_s)),
            )
        path = self.workdir / "sa-kubeconfigs" / f"{namespace}.{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        return write_kubeconfig(path, self.server, self.pki.ca_crt, {"token": tr.status.token},
                                f"system:serviceaccount:{namespace}:{name}")

    def create_namespace(self, name: str) -> str:
        from kubernetes import client

        with self.api() as api:
            client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        return name

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        """What the pod's processes printed (stdout and stderr), as `kubectl logs` serves it
        from the kubelet (all containers when none is named)."""
        if self.node is None:
            raise RuntimeError("this cluster has no node: its pods never run (Cluster(node=True))")
        r = self.kubectl("logs", "-n", namespace, pod, *([f"--container={container}"] if container else ["--all-containers"]),
                         check=False)
        if r.returncode != 0:
            raise FileNotFoundError(f"no log for pod {namespace}/{pod}: {r.stderr.strip()}\n" + self.why_not_run(namespace, pod))
        return r.stdout

    def why_not_run(self, namespace: str, pod: str) -> str:
        """For a failure message: the pod as the API server has it, and which components
        still run, and the end of the kubelet's log."""
        got = self.kubectl("get", "pod", pod, "-n", namespace, "-o",
                           "jsonpath={.spec.nodeName} {.status}", check=False)
        kubelet = next((p for p in self.processes if p.name == "kubelet"), None)
        said = kubelet.tail(40) if kubelet is not None else "(no node: pods never run here)"
        components = ", ".join(f"{p.name} {'alive' if p.alive() else 'EXITED'}" for p in self.processes)
        return (f"the pod: {(got.stdout or got.stderr).strip()[:2000]}\ncomponents: {components}\n"
                f"the kubelet's log ends:\n{said}")

    def wait_for(self, check, what: str, timeout_s: float = 120, interval_s: float = 0.5):
        """Polls `check()` until it returns something truthy (returned) or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
            time.sleep(interval_s)

    def wait_job(self, namespace: str, name: str, timeout_s: float = 120) -> str:
        """Waits for the Job controller to finish Job `namespace/name`: "Complete" or "Failed"."""
        from kubernetes import client

        with self.api() as api:
            batch = client.BatchV1Api(api)

            def finished():
                job = batch.read_namespaced_job(name, namespace)
                done = [c.type for c in job.status.conditions or []
                        if c.type in ("Complete", "Failed") and c.status == "True"]
                return done[0] if done else None

            return self.wait_for(finished, f"Job {namespace}/{name} to complete or fail", timeout_s)

    def _run(self, argv: list[str], input: str | None = None, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, input=input, env=env, capture_output=True, text=True, timeout=300)
        if check and r.returncode != 0:
            raise CommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def install_kuberay(self, watch: tuple[str, ...]) -> None:
        """KubeRay's operator as its chart installs it: its CRDs (server-side: each is over
        the client-side annotation limit), its ServiceAccount and RBAC from the same module, and
        a Deployment in kuberay-system running the operator built from the pinned module,
        watching only the namespaces `watch` (the operator's tests play KubeRay in theirs).
        Once per cluster; returns when the operator is ready."""
        if self.node is None:
            raise RuntimeError("KubeRay needs the real node: Cluster(node=True)")
        if getattr(self, "_kuberay", False):
            return
        from .node import kuberay_manifests

        config = self.bin_dir / "kuberay-config"
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", config / "bases")
        for crd in ("rayclusters", "rayjobs", "rayservices"):
            self.kubectl("wait", "--for=condition=Established", f"crd/{crd}.ray.io", "--timeout=60s")
        self.kubectl("apply", "-f", "-", input=kuberay_manifests(config / "rbac", watch))
        self.kubectl("-n", "kuberay-system", "rollout", "status", "deployment/kuberay-operator", "--timeout=180s")
        self._kuberay = True

    # -- components ------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> Process:
        p = Process(name, argv, self.workdir / f"{name}.log", env)
        self.processes.append(p)
        return p

    spawn = _spawn

    def wait(self, check, what: str) -> None:
        self._wait(check, what)

    def log(self, msg: str) -> None:
        print(f"test cluster: {msg}", file=sys.stderr, flush=True)

    def kubeconfig_for(self, name: str, crt: Path, key: Path) -> Path:
        return write_kubeconfig(self.workdir / f"{name}.kubeconfig", self.server, self.pki.ca_crt,
                                {"client-certificate": str(crt), "client-key": str(key)}, name)

    def _start_scheduler(self) -> None:
        crt, key = self.pki.client("scheduler", "system:kube-scheduler")
        self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig_for('scheduler', crt, key)}",
            "--leader-elect=false", "--secure-port=0", "--profiling=false", "--v=1",
        ])

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",  # throwaway data: skip fsync, it dominates on shared disks
            "--log-level=warn",
        ])

    def _start_apiserver(self) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.host_ip}",
            f"--advertise-address={self.host_ip}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            *([f"--service-cluster-ip-range={self.addresses.service_cidr}"] if self.node else [
                "--service-cluster-ip-range=10.0.0.0/24",
                # The `kubernetes` Service cannot point at a loopback address; nothing uses it.
                "--endpoint-reconciler-type=none"]),
            # `kubectl logs` reaches the kubelet at the node's address.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={pki.ca_crt}",
            f"--kubelet-client-certificate={pki.kubelet_client_crt}",
            f"--kubelet-client-key={pki.kubelet_client_key}",
            "--allow-privileged=false",
            "--profiling=false",
            "--v=1",
        ])

    def _start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self._cm_kubeconfig}",
            "--leader-elect=false",
            # Each controller acts as its own kube-system ServiceAccount with its bootstrap
            # role (system:controller:job-controller, …), as in a real cluster.
            "--use-service-account-credentials=true",
            "--secure-port=0",  # no serving endpoint: readiness is observed through the API
            # All default controllers (job, garbage-collector, serviceaccount(-token), namespace,
            # pod-garbage-collector, ttl-after-finished, replicaset, deployment, cronjob, …); the
            # node-lifecycle controller lifts the not-ready taint the kubelet registers with.
            "--controllers=*",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_crt}",
            "--profiling=false",
            "--v=1",
        ])

    # -- readiness -------------------------------------------------------------------------
    def _wait(self, check, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = None
        while time.monotonic() < deadline:
            dead = [p for p in self.processes if not p.alive()]
            if dead:
                p = dead[0]
                if "address already in use" in p.tail(50):
                    raise PortTaken(f"{p.name}: a port was taken")
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}; "
                                   f"last log lines ({p.log}):\n{p.tail()}")
            try:
                if check():
                    return
            except Exception as e:  # not up yet: connection refused, 403 during bootstrap, …
                last = e
            time.sleep(0.25)
        logs = "\n".join(f"--- {p.name}:\n{p.tail(15)}" for p in self.processes)
        raise TimeoutError(f"timed out after {READY_TIMEOUT_S}s waiting for {what} (last error: {last})\n{logs}")

    def _get(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        conn = http.client.HTTPSConnection(self.host_ip, self.port, context=ctx, timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def _apiserver_ready(self) -> bool:
        return self._get("/readyz")[0] == 200

    def _default_sa_exists(self) -> bool:
        return self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

    def _node_registered(self) -> bool:
        return self._get(f"/api/v1/nodes/{self.node_name}")[0] == 200
