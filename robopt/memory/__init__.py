"""robopt.memory."""
