"""Observability: metrics, access logs, debug endpoints and the admin listener."""
