"""The test cluster's stand-in for a kubelet.

It registers one Node, binds the pods it is responsible for to it, runs their containers and
reports phase, container states, exit codes and termination messages through the pod status
subresource, so the real Job controller completes or fails Jobs.

Pods it runs: those owned by a Job, `helm test` hooks (annotation helm.sh/hook: test) and
any pod annotated `tests.deltafleet.dev/run-locally: "true"`. Others stay Pending.

A container whose image was built by images/build.py --unpack (listed in the image index,
~/.cache/deltafleet/images/index.json, by tag or by digest) runs from that image: its
command (or the image's entrypoint and cmd, with Kubernetes' override rules) inside the
image's root filesystem (sandbox.py: an overlay on the unpacked rootfs, bwrap as the pod's
runAsUser/runAsGroup/fsGroup, read-only where readOnlyRootFilesystem says so), with the
image's env plus the pod's, and each volume bind-mounted at its mountPath (the ServiceAccount
token too, so in-cluster config works as in a cluster). A missing executable is a StartError,
like a runtime's "executable file not found in $PATH".

Any other image (the tests of the runner itself use placeholders) falls back to a local
process: the command runs on the host with the project's venv `bin/` first on PATH, and mounts
are emulated by path remapping: each volumeMount's mountPath maps to a local folder
(hostPath: its path; emptyDir: a temp folder; configMap/secret/projected/downwardAPI:
a folder with the files; persistentVolumeClaim: its PersistentVolume's hostPath when it is bound
to one, else one folder per claim shared by its pods),
and every occurrence of a mountPath (or of the terminationMessagePath) in command, args,
workingDir and env values is rewritten to the local path.

Layout under --workdir: <namespace>/<pod>/{logs/<container>.log, termination/<container>,
volumes/<volume>/, work/}, and pvcs/<namespace>/<claim>/.

Run: python podrunner.py --kubeconfig FILE --workdir DIR  (the cluster fixture starts it).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as dt
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

NODE_NAME = "deltafleet-test-node"
RUN_ANNOTATION = "tests.deltafleet.dev/run-locally"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_TERMINATION_BYTES = 4096  # the kubelet's limit per container
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # FallbackToLogsOnError: the smaller wins
MAX_KILL_GRACE_S = 10  # tests should not wait the default 30 s for a pod to stop

log = logging.getLogger("podrunner")


class ConfigError(Exception):
    """The pod cannot start yet (missing Secret key, unsupported volume, …): the kubelet keeps
    such a container waiting with reason CreateContainerConfigError and retries."""

    reason = "CreateContainerConfigError"


class MountError(ConfigError):
    """A volume cannot be set up for now: an API call for its content (a ServiceAccount token,
    a ConfigMap, a claim) failed or was refused. The kubelet records FailedMount, keeps the
    container ContainerCreating and retries, rather than failing the pod on one bad reply."""

    reason = "ContainerCreating"


class CannotRun(Exception):
    """What this runner can never run (no command, an unsupported volume type, …): the pod
    fails at once with reason StartError rather than waiting forever."""


def api_errors() -> tuple[type[Exception], ...]:
    """What a call to the API server raises when it is refused or fails on the way."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    return ApiException, HTTPError


def describe(e: Exception) -> str:
    """One line for an API error (an ApiException's str is its whole HTTP response)."""
    return f"the API server answered {e.status} {e.reason}" if getattr(e, "status", None) else repr(e)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def selected(pod) -> bool:
    owners = pod.metadata.owner_references or []
    ann = pod.metadata.annotations or {}
    hooks = {h.strip() for h in ann.get("helm.sh/hook", "").split(",")}
    return (
        any(o.kind == "Job" for o in owners)
        or bool(hooks & {"test", "test-success"})
        or ann.get(RUN_ANNOTATION) == "true"
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: if the thread that started it (and so the runner) dies
    without cleaning up, the kernel sends SIGKILL, so no process outlives the test session."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# -- path remapping ------------------------------------------------------------------------
class Remap:
    """Rewrites container paths (mountPaths, the termination message path) to local ones.
    A path matches only whole: `/data` rewrites `/data`, `/data/x`, `--out=/data`,
    `file:///data/x`, but not `/database` or `/srv/data`."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = {k.rstrip("/"): str(v) for k, v in mapping.items() if k.rstrip("/")}
        alts = "|".join(re.escape(k) for k in sorted(self.mapping, key=len, reverse=True))
        self._re = re.compile(rf"(?:(?<=://)|(?<![\w./-]))({alts})(?=/|$|[^\w.-])") if alts else None

    def __call__(self, s: str | None) -> str | None:
        if s is None or self._re is None:
            return s
        return self._re.sub(lambda m: self.mapping[m.group(1)], s)


_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(s: str | None, env: dict[str, str]) -> str | None:
    """Kubernetes' $(VAR) expansion: defined variables are substituted, $$ escapes a $,
    undefined references stay as written."""
    if s is None:
        return None

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, s)


# -- images ----------------------------------------------------------------------------------
IMAGE_INDEX = Path(os.environ.get("DELTAFLEET_IMAGE_CACHE", Path.home() / ".cache" / "deltafleet" / "images")) / "index.json"
SANDBOX = Path(__file__).resolve().parent / "sandbox.py"


def unpacked_image(ref: str | None) -> dict | None:
    """{"rootfs": Path, "config": OCI image config} of an image images/build.py unpacked, looked
    up by reference (tag or digest); None for an image it never built. Read per pod: an image
    built while the runner runs is found."""
    try:
        index = json.loads(IMAGE_INDEX.read_text())
    except (OSError, ValueError):
        return None
    folder = index.get(ref or "")
    if folder is None or not (Path(folder) / "image.json").exists():
        return None
    meta = json.loads((Path(folder) / "image.json").read_text())
    repository = meta["ref"].rsplit(":", 1)[0]
    return {"rootfs": Path(folder) / "rootfs", "config": meta["config"], "id": f"{repository}@{meta['digest']}"}


def image_argv(c, config: dict) -> list[str]:
    """Kubernetes' rules: command replaces the entrypoint (and drops cmd), args replace cmd."""
    if c.command:
        return list(c.command) + list(c.args or [])
    return list(config.get("Entrypoint") or []) + list(c.args if c.args else config.get("Cmd") or [])


@functools.cache
def _sandbox():
    """sandbox.py, loaded by path: this file also runs as a script, with no package around it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deltafleet_pod_sandbox", SANDBOX)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_executable(rootfs: Path, name: str, path_env: str) -> bool:
    """Whether `name` resolves to an executable file inside rootfs (symlinks resolved there)."""
    inside = _sandbox().inside
    candidates = [name] if "/" in name else [f"{d}/{name}" for d in path_env.split(":") if d]
    for cand in candidates:
        p = inside(rootfs, cand)
        if p.is_file() and os.access(p, os.X_OK):
            return True
    return False


def passwd_ids(rootfs: Path, user: str) -> tuple[int, int] | None:
    """uid and gid of a user named in the image's /etc/passwd."""
    try:
        for line in (rootfs / "etc" / "passwd").read_text().splitlines():
            f = line.split(":")
            if len(f) > 3 and f[0] == user:
                return int(f[2]), int(f[3])
    except OSError:
        pass
    return None


# -- one pod -------------------------------------------------------------------------------
class PodWorker(threading.Thread):
    def __init__(self, runner: "Runner", pod):
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.runner, self.core = runner, runner.core
        self.pod = pod
        self.ns, self.name, self.uid = pod.metadata.namespace, pod.metadata.name, pod.metadata.uid
        self.dir = runner.workdir / self.ns / self.name
        self.deleting = threading.Event()
        self.done = threading.Event()
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs_lock = threading.Lock()
        self.statuses: dict[str, dict] = {}  # container name -> containerStatus
        self.init_statuses: dict[str, dict] = {}
        self.image_ids: dict[str, str] = {}  # container -> repository@digest of the image it runs from
        self.phase = "Pending"
        self.start_time = now()
        self._since: dict[str, tuple[str, str]] = {}  # condition type -> (status, when it took that status)
        self.pod_message: str | None = None

    def _bind(self, tries: int = 10) -> bool:
        """Bind the pod to this node, retrying what a busy API server may answer for a while
        (429, 5xx, a reset connection) instead of failing the pod on the first one. False: the
        pod was deleted meanwhile."""
        for attempt in range(tries):
            try:
                self.runner.bind(self.pod)
                return True
            except api_errors() as e:
                status = getattr(e, "status", 0) or 0
                if attempt == tries - 1 or not (status == 0 or status == 429 or status >= 500):
                    raise
                log.warning("pod %s/%s: bind: %s; retrying", self.ns, self.name, getattr(e, "reason", e))
                if self.deleting.wait(min(2 ** attempt * 0.25, 4)):
                    return False
        return False

    # The pod's data: a new pod with a reused name starts from a clean folder.
    def _prepare_dir(self) -> None:
        marker = self.dir / ".uid"
        if self.dir.exists() and (not marker.exists() or marker.read_text() != self.uid):
            shutil.rmtree(self.dir, ignore_errors=True)
        for sub in ("logs", "termination", "volumes", "work"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        marker.write_text(self.uid)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # the API went away at shutdown, or a bug: report it on the pod
            if not self.runner.stopping.is_set():
                log.error("pod %s/%s: %s", self.ns, self.name, traceback.format_exc())
                self.pod_message = f"pod runner error: {e}"
                self.phase = "Failed"
                self._report()
        finally:
            self.done.set()
            if self.deleting.is_set() and not self.runner.stopping.is_set():
                self.runner.force_delete(self.pod)

    def _run(self) -> None:
        if not self.pod.spec.node_name and not self._bind():
            return
        self._prepare_dir()
        spec = self.pod.spec
        said = None
        while True:  # like the kubelet: a config error keeps the pod Pending and is retried
            try:
                volumes = self._volumes()
                plans = self._plans(volumes)
                break
            except CannotRun as e:
                for c in spec.containers:
                    self.statuses[c.name] = self._status(c, {"terminated": {
                        "exitCode": 128, "reason": "StartError", "message": f"pod runner: {e}",
                        "startedAt": now(), "finishedAt": now()}})
                self.phase, self.pod_message = "Failed", f"pod runner: {e}"
                self._report()
                return
            except ConfigError as e:
                if str(e) != said:
                    log.warning("pod %s/%s waits: %s", self.ns, self.name, e)
                    said = str(e)
                for c in spec.containers:
                    self.statuses[c.name] = self._status(c, {"waiting": {"reason": e.reason, "message": str(e)}})
                self._report()
                if self.deleting.wait(2):
                    return
        policy = spec.restart_policy or "Always"
        for c in spec.init_containers or []:
            code = self._run_container(c, plans[c.name], policy, self.init_statuses)
            if code != 0 or self.deleting.is_set():
                self.phase = "Failed"
                for m in spec.containers:
                    self.statuses[m.name] = self._status(m, {"waiting": {"reason": "PodInitializing"}})
                self._report()
                return
        threads = [
            threading.Thread(target=self._run_container, args=(c, plans[c.name], policy, self.statuses), daemon=True)
            for c in spec.containers
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [s["state"].get("terminated", {}).get("exitCode", 137) for s in self.statuses.values()]
        self.phase = "Succeeded" if all(c == 0 for c in codes) and not self.deleting.is_set() else "Failed"
        self._report()

    def _plans(self, volumes: dict[str, Path]) -> dict[str, dict]:
        """How each container runs; a failed API read (a Secret or ConfigMap for its env) is
        retried as the kubelet does, not a failed pod."""
        spec = self.pod.spec
        try:
            return {c.name: self._plan(c, volumes) for c in (spec.init_containers or []) + spec.containers}
        except api_errors() as e:
            raise ConfigError(f"container config: {describe(e)}") from None

    def _run_container(self, c, plan: dict, policy: str, statuses: dict) -> int:
        restarts, backoff = 0, 1.0
        while True:
            code = self._run_once(c, plan, restarts, statuses)
            again = not self.deleting.is_set() and (policy == "Always" or (policy == "OnFailure" and code != 0))
            if not again:
                return code
            restarts += 1
            if self.deleting.wait(backoff):
                return code
            backoff = min(backoff * 2, 10)

    def _run_once(self, c, plan: dict, restarts: int, statuses: dict) -> int:
        last = statuses.get(c.name, {}).get("state", {})
        last_state = {"terminated": last["terminated"]} if "terminated" in last else {}
        term_file: Path = plan["termination_file"]
        term_file.write_text("")
        started = now()
        with open(self.dir / "logs" / f"{c.name}.log", "ab") as logf:
            try:
                with self.procs_lock:
                    if self.deleting.is_set():  # deleted before this container started
                        return 137
                    proc = subprocess.Popen(
                        plan["argv"], cwd=plan["cwd"], env=plan["env"], stdout=logf, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                    )
                    self.procs[c.name] = proc
            except OSError as e:  # command not found, not executable, bad cwd
                logf.write(f"pod runner: cannot start {plan['argv'][0]!r}: {e}\n".encode())
                statuses[c.name] = self._status(c, {"terminated": {
                    "exitCode": 128, "reason": "StartError", "message": str(e), "startedAt": started,
                    "finishedAt": now()}}, restarts, last_state)
                self._report()
                return 128
        cid = f"local://{proc.pid}"
        self.phase = "Running"
        statuses[c.name] = self._status(c, {"running": {"startedAt": started}}, restarts, last_state, cid, ready=True)
        self._report()
        code = proc.wait()
        with self.procs_lock:
            self.procs.pop(c.name, None)
        terminated = {"exitCode": code if code >= 0 else 128 - code, "startedAt": started, "finishedAt": now(),
                      "containerID": cid, "reason": "Completed" if code == 0 else "Error"}
        if code < 0:
            terminated["signal"] = -code
        message = self._termination_message(c, term_file, code)
        if message:
            terminated["message"] = message
        statuses[c.name] = self._status(c, {"terminated": terminated}, restarts, last_state, cid)
        if not self.deleting.is_set():
            # As the kubelet does: the exit is visible (container terminated, pod not Ready)
            # before any restart, so a crash loop never looks continuously Ready.
            self._report()
        return terminated["exitCode"]

    def _termination_message(self, c, term_file: Path, code: int) -> str:
        try:
            with open(term_file, "rb") as f:
                msg = f.read(MAX_TERMINATION_BYTES).decode(errors="replace")
        except OSError:
            msg = ""
        if not msg and code != 0 and c.termination_message_policy == "FallbackToLogsOnError":
            data = (self.dir / "logs" / f"{c.name}.log").read_bytes()
            tail = b"\n".join(data.splitlines()[-FALLBACK_LOG_LINES:])
            msg = tail[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        return msg

    # -- kill --------------------------------------------------------------------------------
    def terminate(self, grace_s: float) -> None:
        """Pod deleted: stop its processes (SIGTERM, then SIGKILL after the grace period)."""
        if self.deleting.is_set():
            return
        self.deleting.set()
        threading.Thread(target=self._kill, args=(grace_s,), daemon=True).start()

    def _kill(self, grace_s: float) -> None:
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.procs:
            time.sleep(0.1)
        self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        with self.procs_lock:
            for p in self.procs.values():
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    # -- status ------------------------------------------------------------------------------
    def _status(self, c, state: dict, restarts: int = 0, last_state: dict | None = None,
                cid: str | None = None, ready: bool = False) -> dict:
        s = {"name": c.name, "image": c.image or "", "imageID": self.image_ids.get(c.name, ""), "ready": ready,
             "started": "running" in state, "restartCount": restarts, "state": state,
             "lastState": last_state or {}}
        if cid:
            s["containerID"] = cid
        return s

    def _report(self) -> None:
        spec = self.pod.spec
        running = self.phase == "Running" and all(s.get("ready") for s in self.statuses.values())
        containers_ready = "True" if running and len(self.statuses) == len(spec.containers) else "False"
        init_done = "True" if all("terminated" in s["state"] and s["state"]["terminated"]["exitCode"] == 0
                                  for s in self.init_statuses.values()) else "False"

        def since(kind: str, value: str) -> str:
            """A condition's lastTransitionTime moves only when its status changes, as the
            kubelet's does: the Deployment controller counts minReadySeconds from it."""
            if self._since.get(kind, ("", ""))[0] != value:
                self._since[kind] = (value, now())
            return self._since[kind][1]

        status = {
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.start_time},
                {"type": "Initialized", "status": init_done, "lastTransitionTime": since("Initialized", init_done)},
                {"type": "ContainersReady", "status": containers_ready, "lastTransitionTime": since("ContainersReady", containers_ready)},
                {"type": "Ready", "status": containers_ready, "lastTransitionTime": since("Ready", containers_ready)},
            ],
            "containerStatuses": [self.statuses[c.name] for c in spec.containers if c.name in self.statuses],
        }
        if self.init_statuses:
            status["initContainerStatuses"] = list(self.init_statuses.values())
        if self.pod_message:
            status["message"] = self.pod_message
        self.runner.patch_status(self.pod, status)

    # -- what a container gets ---------------------------------------------------------------
    def _plan(self, c, volumes: dict[str, Path]) -> dict:
        image = unpacked_image(c.image)
        if image is not None:
            return self._image_plan(c, volumes, image)
        mapping: dict[str, Path] = {}
        for vm in c.volume_mounts or []:
            if vm.name not in volumes:
                raise CannotRun(f"container {c.name}: volumeMount {vm.name!r} names no volume of the pod")
            mapping[vm.mount_path] = volumes[vm.name] / (vm.sub_path or "")
        term_file = self.dir / "termination" / c.name
        mapping[c.termination_message_path or DEFAULT_TERMINATION_PATH] = term_file
        remap = Remap(mapping)
        env = self._env(c, remap, self._identity(c, volumes))
        if not c.command:
            raise CannotRun(f"container {c.name}: no command (an image's entrypoint cannot run outside the image)")
        argv = [remap(expand(a, env)) for a in list(c.command) + list(c.args or [])]
        cwd = Path(remap(c.working_dir)) if c.working_dir else self.dir / "work"
        cwd.mkdir(parents=True, exist_ok=True)
        return {"argv": argv, "env": env, "cwd": str(cwd), "termination_file": term_file}

    def _image_plan(self, c, volumes: dict[str, Path], image: dict) -> dict:
        """Run the container from its unpacked image: sandbox.py with a spec (see its docstring)."""
        config, rootfs = image["config"], image["rootfs"]
        term_file = self.dir / "termination" / c.name
        term_file.touch()
        term_file.chmod(0o666)  # the kubelet's file is writable by any container user
        mounts = [{"source": str(term_file), "target": c.termination_message_path or DEFAULT_TERMINATION_PATH,
                   "read_only": False}]
        for vm in c.volume_mounts or []:
            if vm.name not in volumes:
                raise CannotRun(f"container {c.name}: volumeMount {vm.name!r} names no volume of the pod")
            mounts.append({"source": str(volumes[vm.name] / (vm.sub_path or "")), "target": vm.mount_path,
                           "read_only": bool(vm.read_only)})
        env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
        host, _, port = self.runner.server.removeprefix("https://").rpartition(":")
        env.update({"HOSTNAME": self.name, "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
        env = self._env(c, Remap({}), {}, env)
        argv = [expand(a, env) for a in image_argv(c, config)]
        if not argv:
            raise CannotRun(f"container {c.name}: no command, and image {c.image} has no entrypoint or cmd")
        mounted = [m["target"].rstrip("/") + "/" for m in mounts]
        if not any(argv[0].startswith(m) for m in mounted) and not find_executable(rootfs, argv[0], env.get("PATH", "")):
            raise CannotRun(f'exec: "{argv[0]}": executable file not found in $PATH (image {c.image})')
        uid, gid, groups = self._user(c, config, rootfs)
        csc = c.security_context
        spec = {
            "rootfs": str(rootfs), "read_only": bool(csc and csc.read_only_root_filesystem),
            "uid": uid, "gid": gid, "groups": groups, "hostname": self.name[:63],
            "cwd": c.working_dir or config.get("WorkingDir") or "/", "argv": argv, "env": env, "mounts": mounts,
        }
        self.image_ids[c.name] = image["id"]
        spec_file = self.dir / f"sandbox.{c.name}.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        return {"argv": [sys.executable, str(SANDBOX), str(spec_file)], "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                "cwd": str(self.dir), "termination_file": term_file}

    def _user(self, c, config: dict, rootfs: Path) -> tuple[int, int, list[int]]:
        """uid, gid and groups as a runtime picks them: the container's securityContext, the
        pod's, then the image's USER; runAsNonRoot refused for root as the kubelet does."""
        psc, csc = self.pod.spec.security_context, c.security_context

        def pick(field: str):
            for sc in (csc, psc):
                if sc is not None and getattr(sc, field, None) is not None:
                    return getattr(sc, field)
            return None

        name, _, group = (config.get("User") or "0").partition(":")
        uid, gid = pick("run_as_user"), pick("run_as_group")
        if uid is None:
            if name.isdigit():
                uid, image_gid = int(name), int(group) if group.isdigit() else None
            else:
                ids = passwd_ids(rootfs, name)
                if pick("run_as_non_root"):
                    raise ConfigError(f"container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root")
                if ids is None:
                    raise CannotRun(f"unable to find user {name}: no matching entries in passwd file")
                uid, image_gid = ids
            gid = gid if gid is not None else image_gid
        if gid is None:
            gid = int(group) if group.isdigit() else 0
        if pick("run_as_non_root") and uid == 0:
            raise ConfigError("container has runAsNonRoot and image will run as root")
        groups = [gid]
        if psc is not None and psc.fs_group is not None:
            groups.append(psc.fs_group)
        if psc is not None:
            groups += list(psc.supplemental_groups or [])
        return uid, gid, sorted(set(groups))

    def _identity(self, c, volumes: dict[str, Path]) -> dict[str, str]:
        """In a cluster, a client in the pod finds its ServiceAccount token at SA_MOUNT, a path
        the kubernetes clients hard-code. Here the pod gets KUBECONFIG instead: a kubeconfig
        that reads the token the runner wrote into that mount, so the pod acts with exactly
        its ServiceAccount's rights."""
        vm = next((m for m in c.volume_mounts or [] if m.mount_path.rstrip("/") == SA_MOUNT), None)
        if vm is None:
            return {}
        local = volumes[vm.name]
        path = self.dir / f"kubeconfig.{c.name}"
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "in-cluster", "cluster": {
                "server": self.runner.server, "certificate-authority": str(local / "ca.crt")}}],
            "users": [{"name": "sa", "user": {"tokenFile": str(local / "token")}}],
            "contexts": [{"name": "pod", "context": {"cluster": "in-cluster", "user": "sa", "namespace": self.ns}}],
        }
        path.write_text(json.dumps(cfg))
        return {"KUBECONFIG": str(path)}

    def _env(self, c, remap: Remap, identity: dict[str, str], base: dict[str, str] | None = None) -> dict[str, str]:
        if base is None:  # a local process: the runner's env; HOME stays the runner's, so caches
            base = {**self.runner.base_env, "HOSTNAME": self.name}  # under it (Triton, HF) are shared
        env = {**base, **identity}
        for src in c.env_from or []:
            prefix = src.prefix or ""
            if src.config_map_ref:
                data = self._config_map(src.config_map_ref.name, src.config_map_ref.optional)
            else:
                data = self._secret(src.secret_ref.name, src.secret_ref.optional)
            env.update({prefix + k: remap(v) for k, v in (data or {}).items()})
        for e in c.env or []:
            if e.value_from is None:
                env[e.name] = remap(expand(e.value or "", env))
                continue
            value = self._value_from(c, e.name, e.value_from)
            if value is not None:
                env[e.name] = remap(value)
        return env

    def _value_from(self, c, name: str, vf) -> str | None:
        if vf.secret_key_ref:
            ref = vf.secret_key_ref
            return self._key(self._secret(ref.name, ref.optional), ref, "Secret", name)
        if vf.config_map_key_ref:
            ref = vf.config_map_key_ref
            return self._key(self._config_map(ref.name, ref.optional), ref, "ConfigMap", name)
        if vf.field_ref:
            return self._field(vf.field_ref.field_path)
        if vf.resource_field_ref:
            return self._resource(c, vf.resource_field_ref)
        raise CannotRun(f"env {name}: unsupported valueFrom")

    def _key(self, data: dict | None, ref, kind: str, env_name: str) -> str | None:
        if data is None:
            return None  # optional object that does not exist
        if ref.key not in data:
            if ref.optional:
                return None
            raise ConfigError(f"env {env_name}: couldn't find key {ref.key} in {kind} {self.ns}/{ref.name}")
        return data[ref.key]

    def _field(self, path: str) -> str:
        md = self.pod.metadata
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (getattr(md, m.group(1)) or {}).get(m.group(2), "")
        values = {
            "metadata.name": md.name, "metadata.namespace": md.namespace, "metadata.uid": md.uid,
            "spec.nodeName": NODE_NAME, "spec.serviceAccountName": self.pod.spec.service_account_name or "",
            "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
            "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
        }
        if path not in values:
            raise CannotRun(f"fieldRef {path!r} is not supported by the test pod runner")
        return values[path]

    def _resource(self, c, ref) -> str:
        from kubernetes.utils import parse_quantity

        target = next((x for x in self.pod.spec.containers if x.name == (ref.container_name or c.name)), c)
        kind, _, res = ref.resource.partition(".")
        given = getattr(target.resources, kind, None) if target.resources else None
        if given and res in given:
            q = parse_quantity(given[res])
        else:  # unset: the node's allocatable, as the kubelet reports it
            q = parse_quantity(str(os.cpu_count())) if res == "cpu" else parse_quantity(
                str(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))
        divisor = parse_quantity(ref.divisor or "1")
        return str(math.ceil(q / divisor))

    def _read(self, kind: str, read, name: str, optional: bool | None):
        """A ConfigMap or Secret of the pod's namespace; None when missing and optional."""
        from kubernetes.client.rest import ApiException

        try:
            return read(name, self.ns)
        except ApiException as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError(f"{kind} {self.ns}/{name} not found") from None
            raise

    def _config_map(self, name: str, optional: bool | None) -> dict[str, str] | None:
        cm = self._read("configmap", self.core.read_namespaced_config_map, name, optional)
        if cm is None:
            return None
        data = dict(cm.data or {})
        data.update({k: base64.b64decode(v).decode(errors="replace") for k, v in (cm.binary_data or {}).items()})
        return data

    def _secret(self, name: str, optional: bool | None, raw: bool = False) -> dict | None:
        s = self._read("secret", self.core.read_namespaced_secret, name, optional)
        if s is None:
            return None
        decoded = {k: base64.b64decode(v) for k, v in (s.data or {}).items()}
        return decoded if raw else {k: v.decode(errors="replace") for k, v in decoded.items()}

    # -- volumes -----------------------------------------------------------------------------
    def _claim(self, name: str) -> Path:
        """A claim bound to a hostPath PersistentVolume mounts that path (so claims in several
        namespaces bound to volumes over one folder share it, as over one NFS export); any
        other claim gets one folder of its own, as a freshly provisioned volume."""
        from kubernetes.client.exceptions import ApiException

        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(name, self.ns)
            if pvc.spec.volume_name and pvc.status.phase == "Bound":
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                if pv.spec.host_path:
                    return Path(pv.spec.host_path.path)
        except ApiException as e:
            if e.status != 404:
                raise
        folder = self.runner.workdir / "pvcs" / self.ns / name
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)  # a freshly provisioned volume, writable by the pod's user
        return folder

    def _volumes(self) -> dict[str, Path]:
        out = {}
        for v in self.pod.spec.volumes or []:
            try:
                out[v.name] = self._volume(v)
            except api_errors() as e:
                raise MountError(f"volume {v.name!r}: {describe(e)}") from None
        return out

    def _volume(self, v) -> Path:
        """One volume's local folder (or file), its content written."""
        local = self.dir / "volumes" / v.name
        if v.host_path:
            path = Path(v.host_path.path)
            if v.host_path.type in ("DirectoryOrCreate", None, ""):
                path.mkdir(parents=True, exist_ok=True)
            return path
        if v.empty_dir is not None:
            local.mkdir(parents=True, exist_ok=True)
            local.chmod(0o777)  # as the kubelet makes it: writable by whatever user the pod runs as
            return local
        if v.persistent_volume_claim:
            return self._claim(v.persistent_volume_claim.claim_name)
        if v.config_map:
            data = self._config_map(v.config_map.name, v.config_map.optional) or {}
            self._write_files(local, {k: val.encode() for k, val in data.items()}, v.config_map.items)
        elif v.secret:
            data = self._secret(v.secret.secret_name, v.secret.optional, raw=True) or {}
            self._write_files(local, data, v.secret.items)
        elif v.downward_api:
            self._write_files(local, self._downward(v.downward_api.items), None)
        elif v.projected:
            self._write_files(local, self._projected(v.projected.sources), None)
        else:
            raise CannotRun(f"volume {v.name!r}: this volume type is not supported by the test pod runner")
        return local

    def _projected(self, sources) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        for s in sources or []:
            if s.service_account_token:
                files[s.service_account_token.path] = self.runner.token_for(self.pod, s.service_account_token).encode()
            elif s.config_map:
                data = self._config_map(s.config_map.name, s.config_map.optional) or {}
                files.update(self._select({k: v.encode() for k, v in data.items()}, s.config_map.items))
            elif s.secret:
                data = self._secret(s.secret.name, s.secret.optional, raw=True) or {}
                files.update(self._select(data, s.secret.items))
            elif s.downward_api:
                files.update(self._downward(s.downward_api.items))
        return files

    def _downward(self, items) -> dict[str, bytes]:
        return {i.path: (self._field(i.field_ref.field_path) if i.field_ref else "").encode() for i in items or []}

    @staticmethod
    def _select(data: dict[str, bytes], items) -> dict[str, bytes]:
        if not items:
            return dict(data)
        return {i.path: data[i.key] for i in items if i.key in data}

    def _write_files(self, root: Path, data: dict[str, bytes], items) -> None:
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in self._select(data, items).items():
            target = (root / rel).resolve()
            if not target.is_relative_to(root.resolve()):
                raise CannotRun(f"volume file path {rel!r} escapes its volume")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)


# -- kubectl logs ----------------------------------------------------------------------------
class LogServer:
    """The one kubelet endpoint worth having here: GET /containerLogs/<ns>/<pod>/<container>,
    which the API server proxies for `kubectl logs` and read_namespaced_pod_log. TLS, and only
    clients with a certificate from the cluster's CA (the API server's kubelet client)."""

    def __init__(self, runner: "Runner", cert: str, key: str, client_ca: str):
        import http.server
        import ssl
        import urllib.parse

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    return self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container> is served")
                _, ns, pod, container = parts
                path = runner.workdir / ns / pod / "logs" / f"{container}.log"
                if ".." in parts or not path.is_file():
                    return self.send_error(404, f"no log for container {container} of pod {ns}/{pod}")
                q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
                data = path.read_bytes()
                if "tailLines" in q:
                    lines = data.splitlines(keepends=True)
                    n = int(q["tailLines"])
                    data = b"".join(lines[-n:] if n > 0 else [])
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                if q.get("follow") != "true":
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                with open(path, "rb") as f:  # follow: stream what comes until the container ends
                    f.seek(path.stat().st_size)
                    while True:
                        running = runner.is_running(ns, pod, container)
                        chunk = f.read()
                        if chunk:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        elif not running:
                            return
                        else:
                            time.sleep(0.2)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, name="log-server", daemon=True).start()


# -- the runner ----------------------------------------------------------------------------
class Runner:
    def __init__(self, api_client, workdir: Path, server: str):
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.workdir = workdir
        self.server = server
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        venv_bin = str(Path(sys.executable).parent)
        host, _, port = server.removeprefix("https://").rpartition(":")
        self.base_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.base_env.update({
            "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")]),
            "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
        })

    def is_running(self, ns: str, pod: str, container: str) -> bool:
        with self.lock:
            workers = [w for w in self.workers.values() if (w.ns, w.name) == (ns, pod) and not w.done.is_set()]
        return any(container in w.procs for w in workers)

    def register_node(self, kubelet_port: int = 0) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        labels = {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "node.kubernetes.io/instance-type": "deltafleet-pod-runner"}
        try:
            self.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=NODE_NAME, labels=labels)))
        except ApiException as e:
            if e.status != 409:
                raise
        # TaintNodesByCondition marks a new Node not-ready; with no node-lifecycle controller
        # nothing would lift it, and this node is ready as soon as the runner is.
        node = self.core.read_node(NODE_NAME)
        if node.spec.taints:
            node.spec.taints = None
            self.core.replace_node(NODE_NAME, node)
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        resources = {"cpu": str(os.cpu_count()), "memory": str(mem), "pods": "110", "ephemeral-storage": "100Gi"}
        t = now()
        self.core.patch_node_status(NODE_NAME, {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "deltafleet test pod runner is ready",
                            "lastHeartbeatTime": t, "lastTransitionTime": t}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE_NAME}],
            "nodeInfo": {"kubeletVersion": "v0.0.0-deltafleet-pod-runner", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local://", "kernelVersion": "",
                         "osImage": "", "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        }})

    # -- API calls the workers share -------------------------------------------------------
    def bind(self, pod) -> None:
        from kubernetes import client

        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=pod.metadata.name, uid=pod.metadata.uid),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=NODE_NAME),
        )
        # The reply is a Status the generated client cannot deserialize into V1Binding.
        self.core.create_namespaced_pod_binding(pod.metadata.name, pod.metadata.namespace, body,
                                                _preload_content=False)

    def patch_status(self, pod, status: dict) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise

    def force_delete(self, pod) -> None:
        """What the kubelet does once a deleted pod's containers are gone: delete it for good."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0,
                                            body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                        preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("force delete %s/%s: %s", pod.metadata.namespace, pod.metadata.name, e.reason)

    def token_for(self, pod, projection) -> str:
        from kubernetes import client

        spec = client.V1TokenRequestSpec(
            audiences=[projection.audience] if projection.audience else [],
            expiration_seconds=max(projection.expiration_seconds or 3607, 600),
            bound_object_ref=client.V1BoundObjectReference(api_version="v1", kind="Pod",
                                                           name=pod.metadata.name, uid=pod.metadata.uid),
        )
        tr = self.core.create_namespaced_service_account_token(
            pod.spec.service_account_name or "default", pod.metadata.namespace, client.AuthenticationV1TokenRequest(spec=spec))
        return tr.status.token

    # -- the watch -------------------------------------------------------------------------
    def handle(self, pod, deleted: bool = False) -> None:
        uid = pod.metadata.uid
        with self.lock:
            worker = self.workers.get(uid)
            if deleted:
                if worker:
                    worker.terminate(0)
                    self.workers.pop(uid, None)
                return
            mine = pod.spec.node_name == NODE_NAME or (not pod.spec.node_name and selected(pod))
            if not mine:
                return
            if pod.metadata.deletion_timestamp:
                if worker and not worker.done.is_set():
                    grace = pod.metadata.deletion_grace_period_seconds
                    worker.terminate(min(grace if grace is not None else 30, MAX_KILL_GRACE_S))
                else:
                    self.force_delete(pod)
                return
            if worker or pod.status.phase in ("Succeeded", "Failed") or not selected(pod):
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
            log.info("running pod %s/%s", pod.metadata.namespace, pod.metadata.name)
            worker.start()

    def watch(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        while not self.stopping.is_set():
            try:
                pods = self.core.list_pod_for_all_namespaces()
                for p in pods.items:
                    self.handle(p)
                w = watch.Watch()
                # The server ends the watch after 60 s; the client gives up after 90 s without a
                # byte, so a connection that died silently cannot stall the runner for good.
                for ev in w.stream(self.core.list_pod_for_all_namespaces,
                                   resource_version=pods.metadata.resource_version, timeout_seconds=60,
                                   _request_timeout=(10, 90)):
                    if ev["type"] == "ERROR":
                        break  # e.g. resource version too old: list again
                    self.handle(ev["object"], deleted=ev["type"] == "DELETED")
            except ApiException as e:
                if e.status != 410:
                    log.warning("watch: %s", e)
                    time.sleep(1)
            except Exception as e:  # connection reset while the API server restarts or stops
                if not self.stopping.is_set():
                    log.warning("watch: %r", e)
                    time.sleep(1)

    def shutdown(self) -> None:
        """Runner stopping (test session over): kill every process it started, fast."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.deleting.set()
            w._signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(w.procs for w in workers):
            time.sleep(0.05)
        for w in workers:
            w._signal(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--tls-cert", help="serving certificate for the log endpoint (kubectl logs)")
    ap.add_argument("--tls-key")
    ap.add_argument("--client-ca", help="CA of the API server's kubelet client certificate")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    from kubernetes import config

    api = config.new_client_from_config(config_file=a.kubeconfig)
    a.workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(api, a.workdir, api.configuration.host)

    def on_term(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    _die_with_parent_self()
    try:
        logs = LogServer(runner, a.tls_cert, a.tls_key, a.client_ca) if a.tls_cert else None
        runner.register_node(logs.port if logs else 0)
        log.info("node %s registered; watching pods", NODE_NAME)
        runner.watch()
    finally:
        runner.shutdown()
    return 0


def _die_with_parent_self() -> None:
    """The runner itself ends when the process that started it (pytest, up.py) dies."""
    _die_with_parent()
    if os.getppid() == 1:  # the parent is already gone
        raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
