"""Zoo entry fetchreach_policy (being written)."""
