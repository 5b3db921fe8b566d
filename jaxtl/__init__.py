"""jaxtl: transfer learning of torchvision image classifiers in JAX."""

__version__ = "0.1.0"
