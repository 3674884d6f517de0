"""robopt.tools."""
