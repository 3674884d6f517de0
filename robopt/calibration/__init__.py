"""Calibration data for techniques that need real inputs (static INT8, SmoothQuant, GPTQ, AutoRound, AWQ,
sensitivity analysis): sets by model type, from the zoo's data or the user's files, cached and reproducible."""

from robopt.calibration.base import CalibrationSet, CalibrationSource
from robopt.calibration.files import check_calibration_path
from robopt.calibration.providers import CalibrationProvider, calibration_source, validate_calibration_file
from robopt.calibration.zoo_data import RANDOM_SOURCE

__all__ = [
    "RANDOM_SOURCE",
    "CalibrationProvider",
    "CalibrationSet",
    "CalibrationSource",
    "calibration_source",
    "check_calibration_path",
    "validate_calibration_file",
]
