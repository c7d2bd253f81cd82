"""The namespace testbed: nodes, pods and etcd in network namespaces, and the tools that
drive and check it."""
