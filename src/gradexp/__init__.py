"""gradexp: a laboratory for vanishing and exploding gradients."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradexp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
