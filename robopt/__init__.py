"""robopt: autonomous optimization of robotics models for edge inference."""

__version__ = "0.1.0"
