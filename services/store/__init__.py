"""The Think-Ahead Redis store: the ONLY package that knows Redis keys and value encoding.

The offline worker writes one versioned set of per-user think entries (reasoning + scored ``(a, b)``
prefixes) with `ThinkStore`, verifies it and flips ``current`` to it in one atomic write; the online
API reads the live version with `AsyncThinkReader`. This module does not decode items, run models or
build HTTP bodies.

Keys (``ns`` is the configurable namespace; ``{user}`` is a Redis Cluster hash tag, so a user's think
entries and history live in the same slot and can be read in one pipelined round trip):

====================================  ========  ====================================================
key                                   type      content
====================================  ========  ====================================================
``ns:think:{version}:{<user>}``       string    encoded `ThinkEntry` (compact JSON), SET with EX ttl
``ns:history:{<user>}``               list      recent item ids, oldest first, bounded (LTRIM)
``ns:appended:{<user>}``              list      ids of the user's last appends (a retried append is a no-op)
``ns:think:current``                  string    the live version (flipped with one atomic SET)
``ns:think:previous``                 string    the version live before the last flip (rollback)
``ns:think:{version}:meta``           hash      refresh metadata, one JSON-encoded value per field
``ns:think:{version}:done:{shard}``   set       indices of chunks whose entries are fully written
``ns:think:versions``                 zset      every begun version, scored by creation time (gc)
``ns:stale``                          zset      user -> interactions appended since their live entry
                                                was computed (incremental refresh, most stale first)
====================================  ========  ====================================================

Staleness: each applied append adds its item count to the user's score in ``ns:stale`` (a replayed
append adds nothing); the incremental refresh writes a user's new entry into the *live* version (one
SET per user: a reader gets the old value or the new one, never a mix) and then subtracts the count it
saw when it read the history (`settle_staleness`), so interactions that arrived meanwhile stay counted.
The counter is written after the append script (another slot on Cluster): an append whose counter write
fails is retried by the caller with the same append id, applied once and not counted (an entry then
stays one refresh staler than its score says; the next full refresh resets it).

Readers never see a half-written version: a version's entries are written while ``current`` still
names the old one; ``publish`` counts the new entries and only then flips ``current`` with a single
``SET ... GET`` (atomic, single key, so it also works on Cluster where ``current`` and ``previous``
hash to different slots). ``previous`` is written right after from the value that SET returned; a
crash between the two writes leaves ``previous`` one flip behind, never a wrong ``current``.

On a Redis Cluster (``redis+cluster://host:port[,host:port...]``, `connect.py`; redis-py's own `RedisCluster`,
sync and asyncio) the same keys and commands are used; what differs:

- a user's keys (entry under every version, history, append ids) share the ``{<user>}`` hash tag, so the one
  online round trip (entry + history), the append script (history + append ids) and COPY between versions
  each stay in one slot; the namespace may not contain braces, so no other hash tag can creep in;
- the global keys (``current``, ``previous``, ``versions``, ``stale``, each version's ``meta`` and ``done``
  sets) hash to slots of their own: nothing runs a multi-key command or a script over two of them (the flip
  is one ``SET ... GET``; the staleness script touches only ``stale``);
- pipelines are non-transactional and redis-py splits them per node (one round trip per primary involved);
  ``UNLINK`` of many keys is split per slot by redis-py;
- SCAN (count, status, gc) runs on every primary (redis-py's cluster ``scan_iter``), so it sees every key;
- replication is asynchronous: a write acknowledged by a primary in the instant before it dies may be missing
  on the promoted replica (Redis's own guarantee, measured by ``benchmarks/scale_out.py``);
- a plain ``redis://`` URL naming one cluster node is refused (`connect.ClusterModeError`: "use
  redis+cluster://"), not left to answer ``MOVED`` for two thirds of the users.

Values carry ``SCHEMA_VERSION``; anything that does not decode (foreign bytes, unknown schema, wrong
types, over `MAX_VALUE_BYTES`) raises `CorruptValue` inside this module and reaches callers as
"missing" plus a ``corrupt`` counter. So does a key of the wrong Redis type (a list where an entry
should be, a string where a history should be: ``WRONGTYPE``), which would otherwise look like a
Redis failure and trip the callers' breaker for every user. Entries are read with ``GETRANGE`` up to
one byte past `MAX_VALUE_BYTES`, so an oversized value costs a bounded read, not a transfer of all of
it. Values are held to the standard of HTTP input: text must encode as UTF-8 (a lone surrogate in a
reasoning or model id would only fail when a response is rendered) and ids are non-negative ints below
2**53, else the entry is corrupt. The live-version pointer is validated on each read from Redis (a
string that is not a version name, undecodable bytes, another Redis type): the reader then sees no live
version, says why in `FetchResult.bad_version` and counts it (`AsyncThinkReader.bad_pointer_reads`).
Redis connection errors are not caught: callers own fallback. `write_refusal` tells a write Redis
refused (out of memory, read-only replica, failing persistence) from a Redis that is unreachable.

Reading order: `codec.py` (values), `keys.py` (key names, the version pointer, Redis replies), `writer.py`
(`ThinkStore`, offline), `reader.py` (`AsyncThinkReader`, online), `connect.py` (clients from the URL: one
Redis or a cluster). Everything is re-exported here, so
callers import from `services.store`.
"""

from services.store.codec import (
    MAX_STORED_ID,
    MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    CorruptValue,
    ThinkEntry,
    decode_entry,
    encode_entry,
)
from services.store.connect import ClusterModeError, connect, connect_async, is_cluster_url
from services.store.keys import ThinkKeys, check_version_pointer, write_refusal
from services.store.reader import APPEND_IDS_KEPT, APPEND_IDS_TTL_S, AsyncThinkReader, FetchResult
from services.store.writer import IncompleteVersionError, ThinkStore

__all__ = [
    "APPEND_IDS_KEPT",
    "APPEND_IDS_TTL_S",
    "MAX_STORED_ID",
    "MAX_VALUE_BYTES",
    "SCHEMA_VERSION",
    "AsyncThinkReader",
    "ClusterModeError",
    "CorruptValue",
    "FetchResult",
    "IncompleteVersionError",
    "ThinkEntry",
    "ThinkKeys",
    "ThinkStore",
    "check_version_pointer",
    "connect",
    "connect_async",
    "decode_entry",
    "encode_entry",
    "is_cluster_url",
    "write_refusal",
]
