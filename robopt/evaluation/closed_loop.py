"""Evaluator module closed_loop (being written)."""
