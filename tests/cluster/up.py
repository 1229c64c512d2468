"""Start the test control plane by hand (the same one the `k8s` fixture starts):

    .venv/bin/python tests/cluster/up.py          # Ctrl-C stops everything and cleans up
    export KUBECONFIG=…                           # as printed; then kubectl/helm as usual

The binaries come from `make tools`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `cluster` imports as a package

from cluster.binaries import ToolsMissing  # noqa: E402
from cluster.controlplane import Cluster  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, etcd data) after stopping")
    ap.add_argument("--no-node", action="store_true",
                    help="the control plane only (pods are admitted but never run), without the real node")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        cluster = Cluster(keep_workdir=args.keep, node=not args.no_node)
    except ToolsMissing as e:
        print(f"up.py: {e}", file=sys.stderr)
        return 1
    what = "no node" if args.no_node else "kube-scheduler and a real node"
    print(f"starting etcd, kube-apiserver, kube-controller-manager and {what} in {cluster.workdir} …", flush=True)
    try:
        cluster.start()
    except KeyboardInterrupt:
        return 130  # start() already stopped what it had started
    print(f"ready in {cluster.startup_s:.1f}s: {cluster.server}")
    print(f"tools:      {cluster.bin_dir}  (kubectl, helm)")
    print(f"logs:       {cluster.workdir}/*.log")
    print(f"kubeconfig: {cluster.kubeconfig}")
    print(f"export KUBECONFIG={cluster.kubeconfig} PATH={cluster.bin_dir}:$PATH")
    print("Ctrl-C to stop.", flush=True)
    try:
        while all(p.alive() for p in cluster.processes):
            time.sleep(1)
        dead = [p for p in cluster.processes if not p.alive()]
        print(f"up.py: {dead[0].name} exited; last lines:\n{dead[0].tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping …", flush=True)
        return 0
    finally:
        cluster.stop()
        print("stopped" + (f"; kept {cluster.workdir}" if args.keep else ""))


if __name__ == "__main__":
    sys.exit(main())
