"""slidemil: attention-MIL classification of whole-slide images with heatmaps."""

__version__ = "0.1.0"
