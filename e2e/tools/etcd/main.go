// Command etcd is a thin wrapper around upstream etcd's entry point.
//
// go.etcd.io/etcd/server/v3 carries replace directives in its go.mod, so it
// cannot be built with `go install pkg@version`; this module pins it and its
// sibling modules instead. Build tooling for the local test world only.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
