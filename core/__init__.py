"""DRF (Distribution-based feature Recovery and Fusion): the model, its encoders, training and evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("postsense")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
