"""Zoo entry minilm (being written)."""
