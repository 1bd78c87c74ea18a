"""The read-only operations page and its Prometheus metrics."""
