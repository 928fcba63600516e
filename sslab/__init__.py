"""sslab: self-supervised visual representation learning at scale on Ray."""
__version__ = "0.1.0"
