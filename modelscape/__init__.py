"""modelscape: sweep width, learning rate and richness of neural networks, under muP and friends."""
__version__ = "0.3.0"


def load(*args, **kwargs):
    """Load a sweep's results from its store: ``modelscape.load("results/my_expt")`` -> SweepResults.

    See ``modelscape.backend.store.load``; imported here on first use so ``import modelscape`` stays light.
    """
    from modelscape.backend.store import load as _load
    return _load(*args, **kwargs)
