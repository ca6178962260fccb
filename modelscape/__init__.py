"""modelscape: sweep width, learning rate and richness of neural networks, under muP and friends."""
from modelscape._version import __version__

__all__ = ["__version__", "load"]


def load(*args, **kwargs):
    """Load a sweep's results from its store: ``modelscape.load("results/my_expt")`` -> SweepResults.

    See ``modelscape.backend.store.load``.
    """
    from modelscape.backend.store import load as _load  # worker start-up: every worker imports this package
    return _load(*args, **kwargs)
