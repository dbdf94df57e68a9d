"""lbproxy: a node-local, health-probed TCP load balancer for the Kubernetes API."""

__version__ = "0.1.0"
