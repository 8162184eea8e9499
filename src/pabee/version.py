"""The installed version of pabee, in a leaf module: inner modules record it without importing the package face."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("pabee")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
