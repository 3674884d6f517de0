"""Typed, actionable errors: each says what went wrong and what to do about it."""

from __future__ import annotations


class RoboptError(Exception):
    """Base of every error robopt raises on purpose.

    `message` says what is wrong, `hint` what the user can do. The CLI prints both and
    exits with `exit_code`; the service maps `code` to a structured JSON error.
    """

    code = "robopt_error"
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"error": self.code, "message": self.message, "hint": self.hint}


class ModelNotFoundError(RoboptError):
    code = "model_not_found"


class UnsupportedFormatError(RoboptError):
    code = "unsupported_format"


class CalibrationDataError(UnsupportedFormatError):
    """A calibration data file that is missing, unreadable, or does not match the model's inputs."""

    code = "calibration_data"


class CorruptModelError(RoboptError):
    code = "corrupt_model"


class UnsafePickleError(RoboptError):
    code = "unsafe_pickle"


class ArchitectureRequiredError(RoboptError):
    code = "architecture_required"


class MissingExtraError(RoboptError):
    """An optional dependency is needed for this input or backend."""

    code = "missing_extra"

    def __init__(self, what: str, extra: str, package: str) -> None:
        super().__init__(
            f"{what} needs the optional package '{package}', which is not installed.",
            f"install it with: pip install 'robopt[{extra}]'",
        )
        self.extra = extra
        self.package = package


class InvalidCriteriaError(RoboptError):
    code = "invalid_criteria"


class TechniqueNotFoundError(RoboptError):
    code = "technique_not_found"


class TechniqueNotApplicableError(RoboptError):
    code = "technique_not_applicable"


class BackendUnavailableError(RoboptError):
    code = "backend_unavailable"


class TechniqueFailedError(RoboptError):
    """A technique ran but produced an unusable model (NaN/inf outputs, shape change...)."""

    code = "technique_failed"


class EvaluationError(RoboptError):
    code = "evaluation_failed"


class PrefilterRejectedError(EvaluationError):
    """A cheap offline proxy showed the model is far off, so the expensive evaluation was skipped."""

    code = "prefilter_rejected"


class ResourceLimitError(RoboptError):
    code = "resource_limit"


class ArtifactIntegrityError(RoboptError):
    code = "artifact_corrupt"


class SessionNotFoundError(RoboptError):
    code = "session_not_found"


class CheckpointNotFoundError(RoboptError):
    code = "checkpoint_not_found"


class RequestNotUnderstoodError(RoboptError):
    code = "request_not_understood"


class CancelledError(RoboptError):
    code = "cancelled"
    exit_code = 130
