"""raysegm: brain-MRI tumor segmentation at scale on Ray."""

__version__ = "0.1.0"
