"""The package version: one place, read by ``modelscape.__version__`` and by a sweep's provenance."""
__version__ = "0.3.0"
