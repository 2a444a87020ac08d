"""Servers the service is benchmarked against, and the helper that starts any server under test."""
