"""What is written about a flow: ECS events (pure) for the exporter and the metrics."""
