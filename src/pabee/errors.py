"""Errors that mean "the input is wrong", which the command line reports as a message with exit code 2."""

from collections.abc import Sequence

__all__ = ["DataError", "PabeeError", "require_extra"]


class PabeeError(Exception):
    """Base of the errors a user can fix: bad arguments, missing or malformed data, a taken output folder."""


class DataError(PabeeError):
    """A data file is missing, malformed, or holds a value the task does not allow."""


def require_extra(extra: str, modules: Sequence[str], what: str = "this command") -> None:
    """One line naming the `pabee[extra]` to install when an optional capability's packages are missing."""
    from importlib.util import find_spec

    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise PabeeError(f'{what} needs {", ".join(missing)}: pip install "pabee[{extra}]"')
