"""Domain exceptions shared by every side of the stack.

Each exception carries the HTTP status a server should answer with; the mapping to HTTP
happens in one place in server/. The CLI prints them as one line.
"""

from __future__ import annotations


class UNetPPError(Exception):
    """Base of every error this project raises on purpose."""

    status_code = 500
    error = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(UNetPPError):
    """The caller's input is malformed or inconsistent."""

    status_code = 422
    error = "invalid_input"


class BadParameter(InvalidInput):
    """Request parameters that are each valid but do not go together."""

    error = "invalid_parameter"


class ImageDecodeError(InvalidInput):
    """Bytes that do not decode to a supported image."""

    status_code = 400
    error = "undecodable_image"


class UnsupportedImage(InvalidInput):
    """A well-formed image of a kind this stack does not handle."""

    status_code = 415
    error = "unsupported_media_type"


class ImageTooLarge(InvalidInput):
    """An image above the configured pixel or dimension limits."""

    status_code = 413
    error = "image_too_large"


class ModelRepositoryError(UNetPPError):
    """A model repository that is missing, malformed, tampered with or of an unknown schema."""

    status_code = 503
    error = "model_repository_error"


class ExportError(UNetPPError):
    """An exported graph that fails its checks (ONNX validity, parity with PyTorch)."""

    error = "export_error"


class Cancelled(UNetPPError):
    """Work stopped because its owner cancelled it (a job's DELETE)."""

    status_code = 409
    error = "cancelled"
