"""robopt.graph."""
