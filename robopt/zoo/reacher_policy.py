"""Zoo entry reacher_policy (being written)."""
