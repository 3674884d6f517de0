"""Zoo entry tiny_lm (being written)."""
