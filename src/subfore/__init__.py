"""subfore: anatomy-aware masked image modelling for 3D medical segmentation networks."""

__version__ = "0.1.0"
