//go:build tools

// The node's binaries (kubelet, kube-proxy, kube-scheduler) come from the same pinned
// k8s.io/kubernetes as the control plane: this import keeps their packages in go.sum.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
