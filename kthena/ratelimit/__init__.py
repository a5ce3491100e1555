"""Token estimation and token rate limits."""
