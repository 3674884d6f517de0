"""Imports every built-in task module so each registers itself with the task registry."""

from robopt.robotics import fetchreach_task, minivla_task, reacher_task

__all__ = ["fetchreach_task", "minivla_task", "reacher_task"]
