"""Deciders: the LLM when one is configured, deterministic rules otherwise; both return the same typed objects."""
