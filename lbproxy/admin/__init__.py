"""The admin HTTP server: health, readiness, the endpoint table and Prometheus metrics."""
