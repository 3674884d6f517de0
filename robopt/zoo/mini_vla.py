"""Zoo entry mini_vla (being written)."""
