"""One real Kubernetes node for the test cluster: containerd + runc (Debian's), the kubelet and
kube-proxy (built with the control plane from the pinned k8s.io/kubernetes), the bridge CNI
plugins, and CoreDNS as a pod, all inside the node's own namespaces (netns.py). Images come
from the build's archives (node_images.py), never from a registry.

This VM kind needs three settings (../shared notes, docs/cluster.md): containerd's
`restrict_oom_score_adj` and the kubelet's `oomScoreAdj: 0` (no CAP_SYS_RESOURCE: runc cannot
lower oom_score_adj), `failCgroupV1: false` (a cgroup v1 host), and the node's address on a
veth (no dummy netdev)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import yaml

from . import node_images
from .netns import Namespaces, remove_cgroups

NODE_NAME = "deltafleet-node"
CACHE = Path(os.environ.get("DELTAFLEET_CACHE", Path.home() / ".cache" / "deltafleet"))
DNS_PORT = 1053  # CoreDNS listens unprivileged; the kube-dns Service maps 53 to it


class Addresses:
    """The node's addresses for run number n (1..250): its link to the host, its pods, the
    cluster's Services. Distinct per run, so two clusters on one machine do not collide."""

    def __init__(self, n: int):
        self.n = n
        self.link = f"dfnode{n}"
        self.host_ip, self.node_ip = f"10.123.{n}.1", f"10.123.{n}.2"
        self.pod_cidr, self.service_cidr = f"10.124.{n}.0/24", f"10.125.{n}.0/24"
        self.kubernetes_ip, self.dns_ip = f"10.125.{n}.1", f"10.125.{n}.10"

    @classmethod
    def free(cls) -> "Addresses":
        for n in range(1, 251):
            if not Path(f"/sys/class/net/dfnode{n}").exists():
                return cls(n)
        raise RuntimeError("no free node address range (links dfnode1..250 all exist)")


class Node:
    def __init__(self, cluster, addresses: Addresses, project_images: bool = True):
        """project_images: import the images images/build.py built (else only the node's own)."""
        self.cluster, self.addr, self.project_images = cluster, addresses, project_images
        self.bin_dir = cluster.bin_dir
        self.dir = cluster.workdir / "node"
        self.cgroup_root = f"deltafleet-{addresses.link}"
        self.ns = Namespaces(self.bin_dir / "pause", addresses.link, addresses.host_ip, addresses.node_ip,
                             [addresses.pod_cidr, addresses.service_cidr])
        self._root_lock = None
        self.import_s: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------
    name = NODE_NAME

    def ns_start(self) -> None:
        if self.ns.holder is None:  # a retried start (a port taken) keeps the namespaces
            self.dir.mkdir(parents=True, exist_ok=True)
            self.ns.start()

    def start(self) -> None:
        self._start_containerd()
        self._start_kubelet()
        self._start_kube_proxy()

    def stop(self) -> None:
        self.ns.stop()
        remove_cgroups(self.cgroup_root)
        if self._root_lock is not None:
            self._root_lock.close()
            self._root_lock = None

    # -- containerd ------------------------------------------------------------------------
    def _containerd_root(self) -> Path:
        """The cached root (images imported once) unless another run holds it."""
        root = CACHE / "node" / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root.parent / "containerd.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            self.cluster.log("the cached containerd root is in use by another run: importing into this run's own")
            return self.dir / "containerd-root"
        self._root_lock = lock
        return root

    def ctr(self, *args: str, check: bool = True):
        """`ctr` against the node's containerd, inside the node."""
        return self.ns.run(*self._ctr_argv(), *args, check=check)

    def _ctr_argv(self) -> list[str]:
        return ["ctr", f"--address={self.containerd_sock}", "--namespace=k8s.io"]

    def _start_containerd(self) -> None:
        d = self.dir / "containerd"
        d.mkdir()
        root = self._containerd_root()
        self.containerd_sock = d / "containerd.sock"
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True)
        (cni / "net.d" / "10-pods.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "deltafleet-pods", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.addr.pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "config.toml").write_text(f"""version = 2
root = "{root}"
state = "{d / 'state'}"
oom_score = 0
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{d / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri}]
  sandbox_image = "{node_images.PAUSE_REF}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d / 'runc'}"
[{cri}.cni]
  bin_dir = "{self.bin_dir}"
  conf_dir = "{cni / 'net.d'}"
""")
        self.cluster.spawn("containerd", [*self.ns.enter(), "containerd", f"--config={d / 'config.toml'}"])
        self.cluster.wait(lambda: self.ctr("version", check=False).returncode == 0, "containerd")
        # A killed earlier run's containers and sandboxes (the cached root keeps them).
        old = self.ctr("containers", "list", "--quiet").stdout.split()
        if old:
            self.ctr("containers", "delete", *old, check=False)
        self._root = root
        self.import_images()

    def import_images(self) -> dict[str, float]:
        """Every image the build's index lists (and the node's own) into containerd, each once
        per build: a test that just built an image calls it before naming the image."""
        took = node_images.import_all([*self.ns.enter(), *self._ctr_argv()], self._root, self.bin_dir, self.cluster.log,
                                      project=self.project_images)
        self.import_s.update(took)
        return took

    # -- kubelet ---------------------------------------------------------------------------
    def _start_kubelet(self) -> None:
        pki, d = self.cluster.pki, self.dir / "kubelet"
        d.mkdir()
        crt, key = pki.client("kubelet-node", f"system:node:{NODE_NAME}", "system:nodes")
        kubeconfig = self.cluster.kubeconfig_for("kubelet", crt, key)
        serving_crt, serving_key = pki.server("kubelet-serving", NODE_NAME, [self.addr.node_ip])
        for hierarchy in Path("/sys/fs/cgroup").iterdir():  # the kubelet wants --cgroup-root to exist
            if (hierarchy / "cgroup.procs").exists():
                (hierarchy / self.cgroup_root).mkdir(exist_ok=True)
        (d / "resolv.conf").write_text("")  # pods resolve only cluster names: nothing leaves the VM
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup_root}",
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "address": self.addr.node_ip, "healthzBindAddress": self.addr.node_ip, "readOnlyPort": 0,
            "tlsCertFile": str(serving_crt), "tlsPrivateKeyFile": str(serving_key),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki.ca_crt)}},
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local", "clusterDNS": [self.addr.dns_ip], "resolvConf": str(d / "resolv.conf"),
            "failSwapOn": False, "oomScoreAdj": 0,
            # The test machine's disk is shared with everything else: never evict or GC for it.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "enforceNodeAllocatable": [], "localStorageCapacityIsolation": False,
            "podLogsDir": str(d / "pod-logs"), "serializeImagePulls": False,
            "syncFrequency": "10s", "fileCheckFrequency": "10s",
        }
        (d / "config.yaml").write_text(yaml.safe_dump(config))
        self.cluster.spawn("kubelet", [
            *self.ns.enter(), str(self.bin_dir / "kubelet"), f"--config={d / 'config.yaml'}",
            f"--kubeconfig={kubeconfig}", f"--root-dir={d / 'root'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.addr.node_ip}", "--v=1",
        ])

    def _start_kube_proxy(self) -> None:
        pki, d = self.cluster.pki, self.dir / "kube-proxy"
        d.mkdir()
        crt, key = pki.client("kube-proxy", "system:kube-proxy")
        kubeconfig = self.cluster.kubeconfig_for("kube-proxy", crt, key)
        ip = self.addr.node_ip
        (d / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "mode": "iptables",
            "clusterCIDR": self.addr.pod_cidr, "hostnameOverride": NODE_NAME,
            "bindAddress": ip, "healthzBindAddress": f"{ip}:10256", "metricsBindAddress": f"{ip}:10249",
            "nodePortAddresses": [f"{ip}/32"],
            # Leave the host's conntrack sysctls alone (they are not per namespace).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
        }))
        self.cluster.spawn("kube-proxy", [*self.ns.enter(), str(self.bin_dir / "kube-proxy"),
                                          f"--config={d / 'config.yaml'}", "--v=1"])

    # -- readiness -------------------------------------------------------------------------
    def ready(self) -> bool:
        from kubernetes import client

        with self.cluster.api() as api:
            node = client.CoreV1Api(api).read_node(NODE_NAME)
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    def coredns_manifest(self) -> str:
        """CoreDNS as a Deployment in kube-system with the RBAC it needs and the kube-dns Service
        at the address every pod's resolv.conf names. No `forward`: only cluster names resolve."""
        corefile = (f".:{DNS_PORT} {{\n    errors\n    health :8080\n    ready :8181\n    cache 30\n"
                    "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n        pods insecure\n    }\n}\n")
        labels = {"k8s-app": "kube-dns"}
        docs = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
             "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
             "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "coredns", "namespace": "kube-system"},
             "data": {"Corefile": corefile}},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns", "namespace": "kube-system"},
             "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                 "metadata": {"labels": labels},
                 "spec": {"serviceAccountName": "coredns", "dnsPolicy": "Default", "containers": [{
                     "name": "coredns", "image": node_images.COREDNS_REF, "imagePullPolicy": "Never",
                     "args": ["-conf", "/etc/coredns/Corefile"],
                     "ports": [{"containerPort": DNS_PORT, "protocol": "UDP", "name": "dns"},
                               {"containerPort": DNS_PORT, "protocol": "TCP", "name": "dns-tcp"}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                     "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                         "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                     "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
                     "volumes": [{"name": "config", "configMap": {"name": "coredns"}}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                                                                 "labels": labels},
             "spec": {"selector": labels, "clusterIP": self.addr.dns_ip, "ports": [
                 {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                 {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"}]}},
        ]
        return yaml.safe_dump_all(docs)

    def dns_answers(self) -> bool:
        """The host asks the kube-dns Service IP for the `kubernetes` Service's name: CoreDNS
        serves and kube-proxy has programmed the Service (what every pod's lookups need)."""
        return resolve("kubernetes.default.svc.cluster.local", self.addr.dns_ip) == self.addr.kubernetes_ip

    def dns_ready(self) -> bool:
        from kubernetes import client

        with self.cluster.api() as api:
            slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
                "kube-system", label_selector="kubernetes.io/service-name=kube-dns").items
        return any(e.conditions and e.conditions.ready for s in slices for e in s.endpoints or [])



def resolve(name: str, server: str, timeout_s: float = 1) -> str | None:
    """One DNS A query over UDP (RFC 1035): the first address in the answer, or None."""
    import socket
    import struct

    query = struct.pack(">HHHHHH", 0x1d1d, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        try:
            s.sendto(query, (server, 53))
            reply = s.recv(4096)
        except OSError:
            return None
    if len(reply) < 12 or struct.unpack(">H", reply[6:8])[0] == 0:
        return None
    i = len(query)  # the answers follow the echoed question
    while i < len(reply):
        while i < len(reply) and reply[i] != 0 and reply[i] < 0xC0:  # the owner name: labels …
            i += 1 + reply[i]
        i += 2 if i < len(reply) and reply[i] >= 0xC0 else 1  # … ending in a pointer or a zero
        if i + 10 > len(reply):
            break
        rtype, rclass, _, rdlen = struct.unpack(">HHIH", reply[i:i + 10])
        if rtype == 1 and rclass == 1 and rdlen == 4:
            return socket.inet_ntoa(reply[i + 10:i + 14])
        i += 10 + rdlen
    return None


def kuberay_manifests(rbac: Path, watch: tuple[str, ...], namespace: str = "kuberay-system") -> str:
    """KubeRay's own RBAC files (config/rbac of its module) placed in `namespace`, and the
    operator's Deployment as its chart writes it (non-root, read-only root, probes), watching
    only the namespaces `watch` (its chart's `watchNamespace`)."""
    docs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    kustomization = yaml.safe_load((rbac / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((rbac / name).read_text()):
            if not doc:
                continue
            if doc["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
                doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects", []):
                subject["namespace"] = namespace
            docs.append(doc)
    labels = {"app.kubernetes.io/name": "kuberay-operator"}
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                 "metadata": {"name": "kuberay-operator", "namespace": namespace, "labels": labels},
                 "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                     "metadata": {"labels": labels},
                     "spec": {"serviceAccountName": "kuberay-operator", "containers": [{
                         "name": "kuberay-operator", "image": node_images.KUBERAY_REF, "imagePullPolicy": "Never",
                         "args": ["--log-stdout-encoder=console", f"--watch-namespace={','.join(watch)}"],
                         "ports": [{"containerPort": 8080, "name": "http"}],
                         "readinessProbe": {"httpGet": {"path": "/readyz", "port": 8082}, "periodSeconds": 2},
                         "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8082}, "periodSeconds": 10},
                         "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                             "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                         "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                     }]}}}})
    return yaml.safe_dump_all(docs)
