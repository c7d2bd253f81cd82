"""What the tests share: one module per thing (an etcd, the dataplane's underlay, a
daemon, the CNI plugin as a runtime calls it, ...). Test modules import from here, never
from each other or from conftest.py."""
