"""The client's version, sent in the User-Agent header."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("largebatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
