"""PtychoPINN-XLA: physics-informed neural network ptychography with an XLA-compilable warp."""

__version__ = "0.1.0"
