"""egressgw: an egress gateway for Kubernetes clusters with threat feeds and SIEM export."""

__version__ = "0.1.0"
