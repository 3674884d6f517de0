"""robopt.agents."""
