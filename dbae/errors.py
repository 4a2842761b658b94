"""Errors that describe a user mistake. The CLI prints their message (no traceback)."""


class DBAEError(Exception):
    """Base class: the message is complete and meant for the user."""


class ConfigError(DBAEError, ValueError):
    """A configuration or preset is invalid, or does not match a checkpoint."""


class DataError(DBAEError):
    """An input image or dataset cannot be used (unreadable file, wrong size, ...)."""


class CheckpointError(DBAEError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


class TrainingDiverged(DBAEError):
    """The loss became NaN or infinite."""
