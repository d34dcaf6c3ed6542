"""stackkit: leakage-free stacking of CNN predictions over CT studies."""

__version__ = "0.1.0"
