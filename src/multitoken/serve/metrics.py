"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own per server, so
that several servers (tests) in one process never share counters.

Speculation: tokens per forward = multitoken_decode_tokens_total /
multitoken_decode_row_steps_total (per running row and decode step, bonus token included; 1.0 for
plain decoding); acceptance at depth d = multitoken_draft_accepted_total{depth=d} /
multitoken_draft_attempts_total{depth=d} (draft d accepted, given drafts 1..d-1 were).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: from a millisecond (one tiny-model step) to two minutes (a long queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "multitoken_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter(p + "sequences_finished", "Sequences (choices) finished, by "
                                "reason: stop, length, cancelled (client gone), error",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated",
                                         registry=r)
        self.running = Gauge(p + "requests_running", "Sequences holding a KV-cache row",
                             registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Sequences waiting for a row", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From submission to the first "
                              "token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between tokens of a "
                             "sequence (a step's tokens share its gap)", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_seconds = Histogram(p + "queue_seconds", "From submission to prefill",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram(p + "step_seconds", "Scheduler work per iteration: the "
                                      "prefill of newcomers and the decode step",
                                      ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.row_steps = Counter(p + "decode_row_steps", "Decode steps x rows in them",
                                 registry=r)
        self.step_tokens = Counter(p + "decode_tokens", "Tokens appended by decode steps "
                                   "(before cutting at stops / max_tokens)", registry=r)
        self.draft_attempts = Counter(p + "draft_attempts", "Drafts verified, by depth",
                                      ["depth"], registry=r)
        self.draft_accepted = Counter(p + "draft_accepted", "Drafts accepted, by depth",
                                      ["depth"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
