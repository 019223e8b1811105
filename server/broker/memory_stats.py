"""The memory broker's forecast statistics and priors per model (``base.Statistics``):
what every finished job taught the forecast, kept as ``features.STATS`` vectors."""

from __future__ import annotations

import numpy as np

from ..features import STATS, apply


class MemoryStatistics:
    def __init__(self) -> None:
        self._stats: dict[str, dict[str, np.ndarray]] = {}
        self._stats_version: dict[str, int] = {}
        self._priors: dict[str, dict[str, list[float]]] = {}

    async def observe_cost(self, model: str, task: str, decayed: list[float], added: list[float], forget: float) -> None:
        stats = self._stats.setdefault(model, {})
        stats[task] = apply(stats.get(task, np.zeros(STATS)), decayed, added, forget)
        self._stats_version[model] = self._stats_version.get(model, 0) + 1

    async def cost_stats(self, model: str) -> dict[str, list[float]]:
        return {task: v.tolist() for task, v in self._stats.get(model, {}).items()}

    async def set_priors(self, model: str, priors: dict[str, list[float]]) -> None:
        self._priors[model] = priors
        self._stats_version[model] = self._stats_version.get(model, 0) + 1

    async def priors(self, model: str) -> dict[str, list[float]]:
        return self._priors.get(model, {})

    def stats_version(self, model: str) -> int | None:
        return self._stats_version.get(model, 0)
