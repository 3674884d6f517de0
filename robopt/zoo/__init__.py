"""robopt.zoo."""
