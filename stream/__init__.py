"""The consumer-group runtime: settings, message contracts, CLI, batching, the DRF worker, publishing."""

__version__ = "0.1.0"
