"""HTTP service for encoder bundles: POST /encode with dynamic batching and Prometheus metrics."""
