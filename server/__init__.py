"""easel: a self-hosted image-generation job server."""

from .version import __version__

__all__ = ["__version__"]
