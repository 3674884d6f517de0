"""Training for compression: teacher -> student fitting (distillation, recovery fine-tuning, pruning recovery)."""
