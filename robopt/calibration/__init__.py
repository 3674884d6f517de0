"""Calibration data for techniques that need real inputs (static INT8, SmoothQuant, GPTQ, AutoRound, AWQ,
sensitivity analysis): sets by model type, from the zoo's data or the user's files, cached and reproducible."""

from robopt.calibration.base import CalibrationSet, CalibrationSource

__all__ = ["CalibrationSet", "CalibrationSource"]
