"""Errors that mean "the input is wrong", which the command line reports as a message with exit code 2."""

__all__ = ["DataError", "PabeeError"]


class PabeeError(Exception):
    """Base of the errors a user can fix: bad arguments, missing or malformed data, a taken output folder."""


class DataError(PabeeError):
    """A data file is missing, malformed, or holds a value the task does not allow."""
