"""The server's version (the OpenAPI document and /health say it)."""

__version__ = "0.1.0"
