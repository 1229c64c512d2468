# The test cluster's real node (tests/cluster/node.py): containerd and runc from Debian, with
# the tools the node's setup runs (iptables for kube-proxy and the kubelet, nsenter/unshare
# from util-linux, ip from iproute2), installed only when one is missing. The node's other
# binaries are built from pinned Go modules by `make tools`.
.PHONY: node-tools
TEST_PREREQS += node-tools

node-tools:
	@missing=; for t in containerd runc ctr iptables conntrack nsenter unshare ip sysctl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing the test node's runtime (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc iptables conntrack util-linux iproute2 procps >/dev/null; \
	fi
