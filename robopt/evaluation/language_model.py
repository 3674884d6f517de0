"""Evaluator module language_model (being written)."""
