"""Imports every built-in evaluator module so each registers itself with the evaluator registry."""

from robopt.evaluation import classification, fidelity

__all__ = ["classification", "fidelity"]
