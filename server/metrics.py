"""The Prometheus metrics genarm-serve exports beside vLLM's, and the one way a fallback to the base
model alone is reported: a log line the first time (per reason), a count every time."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("genarm_requests", "Generation requests admitted, by mode", ["mode"])
DIMENSION_REQUESTS = Counter(
    "genarm_dimension_requests", "Requests with a non-zero weight on a reward dimension", ["dimension"]
)
WEIGHTS = Histogram(
    "genarm_request_weight", "Weight each request gave each reward dimension", ["dimension"],
    buckets=(-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
)
REJECTED = Counter("genarm_rejected_requests", "Requests refused, by reason", ["reason"])
# With several API server processes: the in-flight requests of all (livesum); the limit is the
# server's, which every process sets alike (livemax).
INFLIGHT = Gauge("genarm_inflight_requests", "Generation requests being served or queued", multiprocess_mode="livesum")
REQUEST_LIMIT = Gauge(
    "genarm_request_limit", "Generation requests the server admits at once (served plus queued) before HTTP 429",
    multiprocess_mode="livemax",
)
FALLBACKS = Counter(
    "genarm_guidance_fallbacks",
    "Steps or requests served by the base model alone because their guidance weights were unavailable",
    ["reason"],
)
FALLBACK_REASONS = ("no_weight_table", "row_count_mismatch", "invalid_weights")
REJECT_REASONS = ("bad_alignment", "queue_full", "unsupported_endpoint", "unsupported_option")
# Every series exists from the start (at 0), so a dashboard or a test never mistakes a missing one for 0.
for _mode in ("guided", "base"):
    REQUESTS.labels(mode=_mode)
for _reason in REJECT_REASONS:
    REJECTED.labels(reason=_reason)
for _reason in FALLBACK_REASONS:
    FALLBACKS.labels(reason=_reason)

logger = logging.getLogger("genarm.fallback")
_reported: set[str] = set()


def report_fallback(reason: str, message: str) -> None:
    """Count a fallback to the base model alone (`reason`: one of FALLBACK_REASONS); log it the
    first time this reason occurs in this process."""
    FALLBACKS.labels(reason=reason).inc()
    if reason not in _reported:
        _reported.add(reason)
        logger.warning("%s (reported once; counted in genarm_guidance_fallbacks_total{reason=%r})", message, reason)
