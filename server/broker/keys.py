"""Every Redis key the Redis broker uses, one function each (arq-style).

The Lua scripts (``redis_scripts``) build the keys they reach at run time (a
job's hash, a level's Fenwick tree) from the same prefix with the same names;
``redis_scripts.LUA_KEYS`` mirrors this module, keep the two in step.

======================  ===========  ==================================================
key                     type         holds
======================  ===========  ==================================================
``job:{id}``            hash         one JSON value per ``JobRecord`` field, plus
                                     ``cancel`` (1: cancel asked) and ``vec`` (the
                                     job's forecast vector, ``entry=value;...``)
``q:{m}``               sorted set   waiting job -> ``level * 2**32 + position``
``lv:{m}``              sorted set   levels of ``q:{m}`` that hold jobs (score = level)
``seq:{m}``             hash         per level: ``h{level}`` / ``t{level}`` head and
                                     tail counters of the positions
``fen:{m}:{level}``     hash         the level's sparse Fenwick tree over positions
                                     (``node:entry``), its totals (``t:entry``), the
                                     sums of the heads claimed (``p:entry``) and the
                                     entries its jobs use (``u:entry``)
``pop:{m}:{level}``     list         ``position|vec`` of the heads claimed, still in
                                     the tree (redis_scripts.py)
``run:{m}``             sorted set   running job -> lease deadline (Redis TIME)
``wk:{m}``              sorted set   live worker -> presence deadline (Redis TIME)
``wki:{m}``             hash         worker -> its ``WorkerInfo`` JSON
``models``              set          every model that ever had a job or a worker
``seq``                 string       the arrival counter (``JobRecord.seq``)
``done``                sorted set   finished job -> finished_at
``task:{task}``         set          ids of the jobs of a task (dropped lazily)
``cost4:{m}``           hash         fit -> JSON list: forecast statistics (forecast.py)
``prior4:{m}``          hash         fit -> JSON list: the backend's prior
``idem:{key}``          string       ``job_id fingerprint`` of an idempotent submit (EX),
                                     set by the submit script that queues the job
``use:{owner}``         hash         job -> JSON ``[booked at, seconds, open]``: GPU time
``outbox``              sorted set   finished job with a delivery (webhook, uploads) to
                                     make -> when it is due (Redis TIME; a claimed one:
                                     when its claim runs out)
``wev``                 stream       the ``submit``, ``cancel`` and ``command`` events only: what
                                     a worker-only process reads
``ev``                  stream       ``{job, model, kind[, action]}`` wake-up hints
``<blob key>``          string       blob bytes (``img:...``, ``in:...``)
======================  ===========  ==================================================
"""

from __future__ import annotations

DEFAULT_PREFIX = "easel:"


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def queue(self, model: str) -> str:
        return f"{self.prefix}q:{model}"

    def levels(self, model: str) -> str:
        return f"{self.prefix}lv:{model}"

    def counters(self, model: str) -> str:
        return f"{self.prefix}seq:{model}"

    def fenwick(self, model: str, level: int) -> str:
        return f"{self.prefix}fen:{model}:{level}"

    def running(self, model: str) -> str:
        return f"{self.prefix}run:{model}"

    def presence(self, model: str) -> str:
        return f"{self.prefix}wk:{model}"

    def worker_info(self, model: str) -> str:
        return f"{self.prefix}wki:{model}"

    def models(self) -> str:
        return f"{self.prefix}models"

    def seq(self) -> str:
        return f"{self.prefix}seq"

    def done(self) -> str:
        return f"{self.prefix}done"

    def task(self, task: str) -> str:
        return f"{self.prefix}task:{task}"

    # the forecast's statistics and priors, in the format of forecast.FEATURES version 2
    # (another format's keys are left alone, not misread)

    def cost(self, model: str) -> str:
        return f"{self.prefix}cost4:{model}"

    def priors(self, model: str) -> str:
        return f"{self.prefix}prior4:{model}"

    def submit(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def ledger(self, owner: str) -> str:
        return f"{self.prefix}use:{owner}"

    def events(self) -> str:
        return f"{self.prefix}ev"

    def outbox(self) -> str:
        return f"{self.prefix}outbox"

    def worker_events(self) -> str:
        return f"{self.prefix}wev"

    def blob(self, key: str) -> str:
        return f"{self.prefix}{key}"
