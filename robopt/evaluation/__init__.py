"""robopt.evaluation."""
