"""modelscape: sweep width, learning rate and richness of neural networks, under muP and friends."""
__version__ = "0.1.0"
