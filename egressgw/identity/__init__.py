"""Who is talking: a source peer -> the workload (namespace, pod, labels) it belongs to."""
