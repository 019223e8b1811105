"""Python clients for easel.

``Client`` / ``AsyncClient`` (clients.easel): generate, edit, train, upscale,
status, cancel, models; waiting by long-poll or SSE with a timeout.
``clients.mflux``: mflux-server's polling functions (seed 003).
``python -m clients``: a command line with a progress bar.
"""

from __future__ import annotations

from .easel import AsyncClient, Client, GenerateOptions
from .errors import ApiError, EaselError, JobCancelled, JobError, JobFailed, Timeout

__all__ = ["ApiError", "AsyncClient", "Client", "EaselError", "GenerateOptions", "JobCancelled", "JobError", "JobFailed", "Timeout"]
