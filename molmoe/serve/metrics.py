"""The server's Prometheus metrics, written by hand in the text exposition format (0.0.4).

A handful of counters, gauges and histograms need no client library. Every update takes one lock:
the engine thread and the event loop both write.

    molmoe_queue_depth                      gauge      admitted requests not yet decoding
                                                       (preprocessing or waiting for a row)
    molmoe_running_requests                 gauge      requests in the decode batch
    molmoe_requests_total{status=...}       counter    finished chat requests by outcome:
                                                       HTTP status ("200", "400", "429", ...) or
                                                       "cancelled" (the client went away)
    molmoe_generated_tokens_total           counter    tokens generated (EOS included)
    molmoe_tokens_per_second                gauge      generated tokens over the last 10 s / 10 s
    molmoe_time_to_first_token_seconds      histogram  arrival -> first token
    molmoe_request_latency_seconds          histogram  arrival -> last token
"""
from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for le, c in zip(self.buckets + (float("inf"),), self.counts):
            total += c
            bound = "+Inf" if le == float("inf") else repr(le)
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.queue_depth = 0
        self.running = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.tokens_total = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)

    def set_depth(self, queue_depth: int, running: int) -> None:
        with self._lock:
            self.queue_depth, self.running = queue_depth, running

    def request_done(self, status: str) -> None:
        with self._lock:
            self.requests[str(status)] += 1

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.tokens_total += n
            self._recent.append((self._clock(), n))

    def observe(self, ttft_s: float | None, latency_s: float | None) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if latency_s is not None:
                self.latency.observe(latency_s)

    def tokens_per_second(self) -> float:
        with self._lock:
            return self._rate()

    def _rate(self) -> float:
        cutoff = self._clock() - RATE_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> str:
        """The text exposition format."""
        with self._lock:
            lines = []

            def family(name, kind, help_, samples):
                lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

            family("molmoe_queue_depth", "gauge",
                   "Admitted requests not yet decoding (preprocessing or waiting for a row).",
                   [f"molmoe_queue_depth {self.queue_depth}"])
            family("molmoe_running_requests", "gauge", "Requests in the decode batch.",
                   [f"molmoe_running_requests {self.running}"])
            family("molmoe_requests_total", "counter",
                   "Finished chat completion requests by HTTP status, or cancelled.",
                   [f'molmoe_requests_total{{status="{s}"}} {n}'
                    for s, n in sorted(self.requests.items())])
            family("molmoe_generated_tokens_total", "counter", "Tokens generated (EOS included).",
                   [f"molmoe_generated_tokens_total {self.tokens_total}"])
            family("molmoe_tokens_per_second", "gauge",
                   f"Tokens generated over the last {RATE_WINDOW_S:g} s, per second.",
                   [f"molmoe_tokens_per_second {self._rate()!r}"])
            family("molmoe_time_to_first_token_seconds", "histogram",
                   "Time from arrival to the first generated token.",
                   self.ttft.lines("molmoe_time_to_first_token_seconds"))
            family("molmoe_request_latency_seconds", "histogram",
                   "Time from arrival to the last generated token.",
                   self.latency.lines("molmoe_request_latency_seconds"))
            return "\n".join(lines) + "\n"
