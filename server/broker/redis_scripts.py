"""The Redis broker's Lua scripts: every change that touches more than one key.

The scripts are the files of ``lua/``, one per script (its arguments and answer in
its opening comment); each runs after ``lua/prelude.lua`` (shared helpers) with the
key functions of ``keys.KEYS`` generated into it (``keys.lua_keys``).  Each takes
``ARGV[1]`` = key prefix and
``ARGV[2]`` = the events stream's ``MAXLEN ~``; its own arguments follow from
``ARGV[3]``.  Keys are built inside the scripts from the prefix (one primary, no
cluster: see SCALEOUT.md), with the names of ``keys.py``.

Record values are JSON (one per ``JobRecord`` field); the scripts write JSON
texts (``'"running"'``, ``'null'``, numbers as their text) and decode at most a
single field (``model``, ``inputs``), never the whole record.

Queue: ``q:{m}`` scores are ``level * 2^32 + position``; a level holds a lane per
fair-share key (``ln:{m}:{level}:{share}``, the turns between them in
``rr:{m}:{level}``: ``lua/queue.lua``, the rule of ``server/queue.py``).  Within a
lane new jobs take tail positions counting up from 2^31 and re-runs (and moves to
the front) head positions counting down from 2^31 - 1.  Each lane keeps a sparse
Fenwick tree over the 2^32 positions (``fen:{m}:{level}:{share}``, fields
``node:entry`` for the non-zero entries of the job vectors) and its totals
(``t:entry``).  A prefix reads at most 32 nodes (a handful near 2^31, where the
positions are); an update climbs only as high as a prefix of the lane's positions
reads (``fen_top``: up to 2^31 for a head position, up to 2^31 + the lane's tail
capacity ``c`` for a tail one, the capacity doubled as the lane grows), so a push
into a lane of n jobs is about log2(n) node updates per entry, not 32.
Taking a lane's head is cheaper: its vector is added to the lane's popped sums
(``p:entry``) and listed in ``pop:{m}:{level}:{share}``, and stays in the tree;
every popped position is before every waiting one, so the sum of a lane's jobs
before a position is its prefix minus the popped sums (and a lane's waiting total,
its totals minus them).  A re-run pushed at the head would break that order, so it
first takes the listed popped vectors out of the tree for real.  A lane that
empties is deleted (which also drops float drift), like the in-memory queue's;
a level that empties, with its turns.  The sum ahead of a job reads its own lane's
prefix, one prefix per other lane of its level (the count of its jobs whose turn
comes first: a key's position found by ZRANGE) and the totals of the lanes of the
levels before: O(lanes · log n), flat in the queue's depth.
"""

from __future__ import annotations

from pathlib import Path

from ..features import WIDTH
from .keys import lua_keys

LUA = Path(__file__).with_name("lua")
KEYS_MARK = "-- @keys"


def prelude() -> str:
    """``lua/prelude.lua`` with the generated key functions, and ``WIDTH`` (the length
    of a job's forecast vector), in place of its ``@keys`` line."""
    lines = (LUA / "prelude.lua").read_text().splitlines()
    generated = f"{lua_keys()}\nlocal WIDTH = {WIDTH}"
    return "\n".join(generated if line.startswith(KEYS_MARK) else line for line in lines) + "\n"


SHARED = ("prelude", "queue")  # before every script, in this order


def load() -> dict[str, str]:
    """Every script by name (its file's stem), each with the prelude and the queue's
    functions (``lua/queue.lua``) before it."""
    shared = prelude() + (LUA / "queue.lua").read_text()
    return {path.stem: shared + path.read_text() for path in sorted(LUA.glob("*.lua")) if path.stem not in SHARED}


SCRIPTS: dict[str, str] = load()
