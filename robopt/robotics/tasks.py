"""Imports every built-in task module so each registers itself with the task registry."""
