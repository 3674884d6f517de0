"""Zoo entry openvla (being written)."""
