"""The consumer-group runtime: settings, message contracts, CLI, batching, the DRF worker, publishing."""

from core import __version__

__all__ = ["__version__"]
