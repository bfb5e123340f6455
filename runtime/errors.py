"""onsight's error hierarchy: every error says what went wrong and what to do about it."""

from __future__ import annotations


class OnsightError(Exception):
    """Base class for errors a user can act on (the CLI prints the message, no traceback)."""

    exit_code = 2


class BundleError(OnsightError):
    """A bundle directory is missing, corrupt, or was built for another machine."""

    exit_code = 2


class SourceError(OnsightError):
    """A video source could not be opened or read."""

    exit_code = 3


class SourceSpecError(SourceError):
    """The source argument itself is malformed (empty, wrong type): a usage error."""

    exit_code = 2


class EngineError(OnsightError):
    """An inference backend is unavailable or failed."""

    exit_code = 2


class CheckpointError(OnsightError):
    """A checkpoint on disk is malformed or unsupported (raised by the exporter's loaders)."""

    exit_code = 2


class ExportError(OnsightError):
    """An export or build could not complete (bad flags, failed parity, missing TensorRT)."""

    exit_code = 2
