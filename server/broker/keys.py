"""Every Redis key the Redis broker uses, one function each (arq-style).

One table (``KEYS``) names them all.  ``Keys`` builds them in Python; the Lua scripts
(``lua/*.lua``, loaded by ``scripts.py``) get the same table as generated functions
(``k_job(id)``, ``k_fenwick(m, level, share)``) and constants (``K_OUTBOX``), so a key's
name is written once.

======================  ===========  ==================================================
key                     type         holds
======================  ===========  ==================================================
``job:{id}``            hash         one JSON value per ``JobRecord`` field, plus
                                     ``cancel`` (1: cancel asked) and ``vec`` (the
                                     job's forecast vector, ``entry=value;...``)
``q:{m}``               sorted set   waiting job -> ``level * 2**32 + position`` (the
                                     position in its lane: not the run order)
``lv:{m}``              sorted set   levels of ``q:{m}`` that hold jobs (score = level)
``ln:{m}:{level}:{s}``  sorted set   a fair-share lane: the waiting jobs of share ``s``
                                     at the level -> position (lua/queue.lua)
``rr:{m}:{level}``      hash         the level's turns: ``clock``, ``opened``, per lane
                                     ``b:s`` base, ``s:s`` stride, ``o:s`` opened as
``seq:{m}``             hash         per lane: ``h{s}:{level}`` / ``t{s}:{level}`` head
                                     and tail counters of the positions
``fen:{m}:{level}:{s}`` hash         the lane's sparse Fenwick tree over positions
                                     (``node:entry``), its totals (``t:entry``), the
                                     sums of the heads taken (``p:entry``) and the
                                     entries its jobs use (``u:entry``)
``fen:{m}:{level}``      hash         before fair share: the level's one tree (and
``pop:{m}:{level}``     list         its popped heads); lua/migrate_lanes.lua moves
                                     such a queue's jobs into lanes and removes them
``pop:{m}:{level}:{s}`` list         ``position|vec`` of the heads taken, still in
                                     the tree (lua/queue.lua)
``run:{m}``             sorted set   running job -> lease deadline (Redis TIME)
``wk:{m}``              sorted set   live worker -> presence deadline (Redis TIME)
``wki:{m}``             hash         worker -> its ``WorkerInfo`` JSON
``models``              set          every model that ever had a job or a worker
``seq``                 string       the arrival counter (``JobRecord.seq``)
``done``                sorted set   finished job -> finished_at
``done:{owner}``        sorted set   the same, of one owner (key id; empty for none):
                                     counted per owner (entries older than the
                                     result TTL are trimmed when counted)
``task:{task}``         set          ids of the jobs of a task (dropped lazily)
``cost4:{m}``           hash         fit -> JSON list: forecast statistics (forecast.py)
``prior4:{m}``          hash         fit -> JSON list: the backend's prior
``idem:{key}``          string       ``job_id fingerprint`` of an idempotent submit (EX),
                                     set by the submit script that queues the job
``use:{owner}``         hash         job -> JSON ``[booked at, seconds, open]``: GPU time
                                     booked by the submit script (keys with a GPU-second
                                     quota), settled by every script that ends the job
``held:{owner}``        set          the owner's unfinished jobs (keys with a quota):
                                     added by the submit script, removed by every script
                                     that ends the job (``max_queued``)
``paused``              set          the paused queues: model names, ``*`` for every one
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

import re

DEFAULT_PREFIX = "easel:"
# name -> template under the prefix; {placeholders} are the key's parts
KEYS: dict[str, str] = {
    "job": "job:{id}",
    "queue": "q:{m}",
    "levels": "lv:{m}",
    "counters": "seq:{m}",
    "lane": "ln:{m}:{level}:{share}",
    "turns": "rr:{m}:{level}",
    "fenwick": "fen:{m}:{level}:{share}",
    "popped": "pop:{m}:{level}:{share}",
    # a level's sums and popped list before fair share (one per level): removed by lua/migrate_lanes.lua
    "old_fenwick": "fen:{m}:{level}",
    "old_popped": "pop:{m}:{level}",
    "running": "run:{m}",
    "presence": "wk:{m}",
    "worker_info": "wki:{m}",
    "models": "models",
    "seq": "seq",
    "done": "done",
    "owner_done": "done:{owner}",
    "task": "task:{task}",
    # the forecast's statistics and priors, in the format of features.FEATURES version 4
    # (another format's keys are left alone, not misread)
    "cost": "cost4:{m}",
    "priors": "prior4:{m}",
    "submit": "idem:{key}",
    "ledger": "use:{owner}",
    "held": "held:{owner}",
    "events": "ev",
    "worker_events": "wev",
    "outbox": "outbox",
    "paused": "paused",
    "blob": "{key}",
}
_PART = re.compile(r"\{(\w+)\}")


class Keys:
    """``Keys(prefix).job(id)`` and so on: every key of ``KEYS`` under the prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def key(self, name: str, *parts: object) -> str:
        names = _PART.findall(KEYS[name])
        return self.prefix + KEYS[name].format(**dict(zip(names, map(str, parts), strict=True)))

    def job(self, job_id: str) -> str:
        return self.key("job", job_id)

    def queue(self, model: str) -> str:
        return self.key("queue", model)

    def levels(self, model: str) -> str:
        return self.key("levels", model)

    def counters(self, model: str) -> str:
        return self.key("counters", model)

    def lane(self, model: str, level: int, share: str) -> str:
        return self.key("lane", model, level, share)

    def turns(self, model: str, level: int) -> str:
        return self.key("turns", model, level)

    def fenwick(self, model: str, level: int, share: str) -> str:
        return self.key("fenwick", model, level, share)

    def running(self, model: str) -> str:
        return self.key("running", model)

    def presence(self, model: str) -> str:
        return self.key("presence", model)

    def worker_info(self, model: str) -> str:
        return self.key("worker_info", model)

    def models(self) -> str:
        return self.key("models")

    def seq(self) -> str:
        return self.key("seq")

    def done(self) -> str:
        return self.key("done")

    def owner_done(self, owner: str | None) -> str:
        return self.key("owner_done", owner or "")

    def task(self, task: str) -> str:
        return self.key("task", task)

    def cost(self, model: str) -> str:
        return self.key("cost", model)

    def priors(self, model: str) -> str:
        return self.key("priors", model)

    def submit(self, key: str) -> str:
        return self.key("submit", key)

    def ledger(self, owner: str) -> str:
        return self.key("ledger", owner)

    def held(self, owner: str) -> str:
        return self.key("held", owner)

    def events(self) -> str:
        return self.key("events")

    def outbox(self) -> str:
        return self.key("outbox")

    def paused(self) -> str:
        return self.key("paused")

    def worker_events(self) -> str:
        return self.key("worker_events")

    def blob(self, key: str) -> str:
        return self.key("blob", key)


def lua_keys() -> str:
    """``KEYS`` as Lua, for the scripts' prelude: ``local function k_job(id) return P ..
    'job:' .. id end`` per key with parts (a level formatted as an integer), ``local
    K_OUTBOX = P .. 'outbox'`` per key without."""
    out = []
    for name, template in KEYS.items():
        parts = _PART.findall(template)
        pieces = [f"'{p}'" if i % 2 == 0 else (f"int({p})" if p == "level" else p)
                  for i, p in enumerate(_PART.split(template)) if p]  # fmt: skip
        text = " .. ".join(["P", *pieces])
        if parts:
            out.append(f"local function k_{name}({', '.join(parts)}) return {text} end")
        else:
            out.append(f"local K_{name.upper()} = {text}")
    return "\n".join(out)
