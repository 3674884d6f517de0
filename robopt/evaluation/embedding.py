"""Evaluator module embedding (being written)."""
