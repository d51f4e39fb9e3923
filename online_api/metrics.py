"""Prometheus metrics of the online API, one registry per app (tests build many apps per process).

Names are ``onerec_*``; latencies are in seconds (Prometheus convention). This module only defines and
renders metrics; the code paths that observe them live in `complete.py`, `batching.py` and the routes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latencies of a millisecond service: fine buckets below 100 ms.
_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
_REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """All collectors of one app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "onerec_recommend_latency_seconds", "recommend latency by answer source", ["source"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "onerec_recommend_total", "recommend answers by source and degradation", ["source", "degraded"],
            registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "onerec_fallback_total", "answers not produced by the model as planned, by reason", ["reason"], registry=r
        )
        self.redis_latency = Histogram(
            "onerec_redis_latency_seconds", "Redis round trips by operation", ["op"], buckets=_REDIS_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.redis_errors = Counter("onerec_redis_errors_total", "failed Redis operations", ["op"], registry=r)
        self.think_lookups = Counter(
            "onerec_think_lookups_total", "think-ahead entry lookups: hit, miss, corrupt, unusable", ["result"],
            registry=r,
        )  # fmt: skip
        self.corrupt = Counter("onerec_corrupt_values_total", "Redis values treated as missing", registry=r)
        self.unknown_items = Counter("onerec_unknown_items_total", "history items not in the catalogue", registry=r)
        self.batch_size = Histogram(
            "onerec_batch_size", "model calls per micro-batch", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.model_latency = Histogram(
            "onerec_model_batch_seconds", "model time per micro-batch", ["kind"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "onerec_model_queue_seconds", "time a job waited for the model thread", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.pending_events = Gauge("onerec_pending_events", "events queued while Redis is unavailable", registry=r)
        self.events = Counter("onerec_events_total", "appended interactions", ["stored"], registry=r)
        self.events_replayed = Gauge(
            "onerec_events_replayed", "queued appends Redis had applied already (skipped on retry, not duplicated)",
            registry=r,
        )  # fmt: skip
        self.model_restarts = Gauge(
            "onerec_model_process_restarts", "model child processes started after the first (each: one died)",
            registry=r,
        )  # fmt: skip
        self.model_standby = Gauge(
            "onerec_model_standby_calls", "model calls run in the API process while its model process restarted",
            registry=r,
        )  # fmt: skip
        self.ready = Gauge("onerec_ready", "1 when model and Redis are ready", registry=r)
        # hostile input: write refusals are not read failures; a bad live-version pointer is named, not a crash
        self.write_refusals = Counter(
            "onerec_redis_write_refusals_total", "writes Redis refused while answering (oom, readonly, misconf)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.breaker_open = Gauge("onerec_redis_breaker_open", "1 while the Redis read breaker skips Redis",
                                  registry=r)  # fmt: skip
        self.pointer_valid = Gauge(
            "onerec_version_pointer_valid", "0 when the last read live-version pointer was unusable (else 1)",
            registry=r,
        )  # fmt: skip
        self.pointer_bad_reads = Gauge(
            "onerec_version_pointer_bad_reads", "reads of the live-version pointer that found it unusable", registry=r
        )
        self.think_ahead_degraded = Gauge(
            "onerec_think_ahead_degraded",
            "1 when /readyz found no usable live think-ahead version (no pointer, an unusable one, or one naming no "
            "version): every answer is online-only; alert on it",
            registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
