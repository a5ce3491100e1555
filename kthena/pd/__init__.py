"""Prefill/decode disaggregated serving: KV connectors, pairing, orchestration."""
