"""pp-flower: privacy-preserving image classification with a transformation network trained on Flower."""

__version__ = "0.1.0"
