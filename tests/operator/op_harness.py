"""What the operator's integration tests run for real: the operator as a subprocess (so a
test can kill it), a local Ray head on loopback, the chart's RBAC, and polling helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from ports import free_port  # noqa: F401 -- the operator tests import it from here

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CHART = REPO / "charts" / "deltafleet"
KUBERAY_CRD_SCRIPT = Path(__file__).with_name("kuberay-crd.sh")
SYSTEM_NS = "deltafleet-system"  # where the chart is installed
RAY_NS = "ray-system"  # where the RayService lives
RAYSERVICE = "pool-service"


def wait_for(check, timeout: float, what: str, interval: float = 0.5, on_timeout=lambda: ""):
    """Poll `check()` until it returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 -- report the last one if it never settles
            last_error = e
        time.sleep(interval)
    extra = on_timeout()
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else "") + (f"\n{extra}" if extra else ""))


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60, token: str | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class OperatorProcess:
    """`deltafleet operator …` as a child process with its own log file."""

    def __init__(self, kubeconfig: Path, args: list[str], log_dir: Path, env: dict | None = None):
        self.kubeconfig, self.args, self.env = kubeconfig, args, env or {}
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="operator-", suffix=".log", dir=log_dir)[1])
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PATH=f"{VENV_BIN}:{os.environ['PATH']}", **self.env)
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "deltafleet"), "operator", *self.args, "--liveness-port", str(self.port), "--verbose"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
            )
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self, tail: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "operator log (tail):\n" + "\n".join(lines[-tail:])


class LocalRay:
    """`ray start --head --block` on loopback in its own session; Serve's HTTP proxy on a free port.

    Token authentication is on, as Ray 2.60 sets up clusters it starts itself: the dashboard
    answers 401 without `Authorization: Bearer <token>` (the operator gets the token file)."""

    def __init__(self):
        self.gcs_port, self.dashboard_port, self.http_port = free_port(), free_port(), free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="dfray-", dir="/tmp")  # Ray's socket paths must stay short
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.token_file = Path(self.temp_dir) / "auth_token"
        self.token_file.write_text(uuid.uuid4().hex)
        self.token = self.token_file.read_text()
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                        RAY_DEDUP_LOGS="0", PYTHONSAFEPATH="1",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "LocalRay":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                 f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={self.temp_dir}",
                 "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir,
            )
        wait_for(lambda: http_json("GET", self.dashboard_url + "/api/serve/applications/", timeout=5, token=self.token)[0] == 200,
                 180, "the Ray dashboard's Serve API", interval=1, on_timeout=self.log)
        subprocess.run(
            [str(VENV_BIN / "serve"), "start", f"--address=127.0.0.1:{self.gcs_port}",
             "--http-host=127.0.0.1", f"--http-port={self.http_port}"],
            env=self.env, check=True, capture_output=True, timeout=180, cwd=self.temp_dir,
        )
        return self

    def applications(self) -> dict:
        return http_json("GET", self.dashboard_url + "/api/serve/applications/", token=self.token)[1].get("applications") or {}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group `ray start` made: only what we started
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def wait_established(k8s, crd: str, timeout: float = 60) -> None:
    """`kubectl wait --for=condition=Established` fails outright while a just-created CRD has no
    status.conditions yet, so poll its condition instead."""
    def established():
        r = k8s.kubectl("get", "crd", crd, "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False)
        return r.returncode == 0 and r.stdout.strip() == "True"
    wait_for(established, timeout, f"CRD {crd} Established")


def kuberay_crd() -> Path:
    out = subprocess.run(["bash", str(KUBERAY_CRD_SCRIPT)], check=True, capture_output=True, text=True, timeout=600)
    return Path(out.stdout.strip().splitlines()[-1])


class FineTunes:
    """kubectl-level access to one namespace's FineTunes, Jobs and Events (admin: the test's view)."""

    def __init__(self, k8s, namespace: str, tmp_path: Path):
        self.k8s, self.ns, self.tmp = k8s, namespace, tmp_path

    def apply(self, manifest: str) -> None:
        path = self.tmp / f"manifest-{time.monotonic_ns()}.yaml"
        path.write_text(manifest)
        self.k8s.kubectl("apply", "-f", path)

    def get(self, name: str) -> dict | None:
        r = self.k8s.kubectl("-n", self.ns, "get", "finetune", name, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def condition(self, name: str, type_: str) -> dict:
        ft = self.get(name) or {}
        return next((c for c in (ft.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})

    def wait_condition(self, name: str, type_: str, status: str, timeout: float, reason: str | None = None, log=lambda: "") -> dict:
        def check():
            c = self.condition(name, type_)
            if c.get("status") == status and (reason is None or c.get("reason") == reason):
                return self.get(name)
            return None
        return wait_for(check, timeout, f"{self.ns}/{name} {type_}={status}" + (f" ({reason})" if reason else ""),
                        on_timeout=lambda: f"conditions: {json.dumps((self.get(name) or {}).get('status'), indent=1)}\n{log()}")

    def patch(self, name: str, patch: dict) -> None:
        self.k8s.kubectl("-n", self.ns, "patch", "finetune", name, "--type=merge", "-p", json.dumps(patch))

    def jobs(self) -> list[dict]:
        return json.loads(self.k8s.kubectl("-n", self.ns, "get", "jobs", "-o", "json").stdout)["items"]

    def job_names(self) -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.jobs())

    def event_reasons(self, name: str) -> list[str]:
        items = json.loads(self.k8s.kubectl("-n", self.ns, "get", "events", "--field-selector",
                                            f"involvedObject.name={name},involvedObject.kind=FineTune", "-o", "json").stdout)["items"]
        return [e["reason"] for e in items]


def finetune_yaml(name: str, namespace: str, *, base: str = "bases/tiny", finetuned: str = "finetunes/tiny-code",
                  pool: str | None = None, min_fidelity: float = 0.0, backoff_limit: int = 1, steps: int = 2,
                  model_name: str | None = None, api_key_secret: str | None = None) -> str:
    pool_line = f"\n    pool: {pool}" if pool else ""
    pool_line += f"\n    modelName: {model_name}" if model_name else ""
    pool_line += f"\n    apiKeySecretRef: {{name: {api_key_secret}}}" if api_key_secret else ""
    return f"""
apiVersion: deltafleet.dev/v1alpha1
kind: FineTune
metadata:
  name: {name}
  namespace: {namespace}
spec:
  baseModel: {{path: {base}}}
  fineTunedModel: {{path: {finetuned}}}
  compression:
    steps: {steps}
    batchSize: 2
    gpus: 0
    minFidelity: {min_fidelity}
    calibration: {{path: data/cal.txt, samples: 4, seqLen: 32}}
  serving:{pool_line}
    gpusPerReplica: 0
    minReplicas: 1
    maxReplicas: 1
  backoffLimit: {backoff_limit}
  activeDeadlineSeconds: 600
"""


def create_store_claim(k8s, namespace: str, name: str = "models") -> None:
    """The model store's claim in a namespace (the operator checks it before creating a Job). No
    volume binds it, so pods that mount it stay Pending: its tests check Jobs and admission, not a run."""
    k8s.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}))
