// etcd server binary for the test control plane: the same few lines as etcd's own main.go,
// built inside this module so its version is pinned by go.mod next to kube-apiserver's.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
