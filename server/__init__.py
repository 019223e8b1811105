"""easel: a self-hosted image-generation job server."""

__version__ = "0.1.0"
