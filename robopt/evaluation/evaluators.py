"""Imports every built-in evaluator module so each registers itself with the evaluator registry."""

from robopt.evaluation import classification, closed_loop, embedding, fidelity, language_model

__all__ = ["classification", "closed_loop", "embedding", "fidelity", "language_model"]
