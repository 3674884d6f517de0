"""Typed export errors: the format cannot hold the model, the output folder is in the way, or verification failed."""

from __future__ import annotations

from robopt.errors import RoboptError


class ExportError(RoboptError):
    """An export could not be written (bad output folder, unknown reference, nothing to verify with)."""

    code = "export_failed"


class NotExportableError(ExportError):
    """The requested format cannot represent this model; the hint names a format that can."""

    code = "not_exportable"


class ExportVerificationError(ExportError):
    """The exported files, loaded without robopt, did not reproduce the artifact's outputs."""

    code = "export_verification_failed"
