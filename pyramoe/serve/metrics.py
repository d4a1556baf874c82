"""The server's Prometheus metrics (own registry, so two servers in one process never mix): requests
by endpoint and status, tokens, queue and batch, latency histograms, and the tokens each MoE
layer's router has sent to each expert (read from the engine at scrape time)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Seconds: from a few milliseconds (a CPU decode step) to minutes (a long generation).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10, 20, 40, 80, 160)


class _ExpertLoad(Collector):
    def __init__(self, counts: Callable[[], tuple[list[int], torch.Tensor]]):
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("pyramoe_expert_routed_tokens", "Tokens the router of each MoE layer sent to "
                                     "each expert (each token counts once per chosen expert)",
                                     labels=["layer", "expert"])
        layers, counts = self.counts()
        for layer, row in zip(layers, counts.tolist()):
            for expert, value in enumerate(row):
                family.add_metric([str(layer), str(expert)], value)
        yield family


class ServerMetrics:
    def __init__(self, expert_counts: Callable[[], tuple[list[int], torch.Tensor]] | None = None,
                 gauges: Callable[[], dict[str, float]] | None = None):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("pyramoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("pyramoe_prompt_tokens", "Prompt tokens submitted", registry=registry)
        self.generated_tokens = Counter("pyramoe_generation_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("pyramoe_time_to_first_token_seconds", "Request arrival to its first "
                                             "token", buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("pyramoe_inter_token_latency_seconds", "Between consecutive tokens of a choice",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.request_latency = Histogram("pyramoe_e2e_request_latency_seconds", "Request arrival to its last token",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self._gauges = {
            name: Gauge(f"pyramoe_{name}", text, registry=registry)
            for name, text in (("queue_depth", "Requests waiting for a KV-cache slot"),
                               ("running_requests", "Requests holding a KV-cache slot (the running batch)"),
                               ("free_slots", "Free KV-cache slots"),
                               ("engine_steps", "Engine steps run"),
                               ("kv_cache_blocks_used", "KV-cache blocks held by requests"),
                               ("kv_cache_blocks", "KV-cache blocks in all"),
                               ("prefix_cache_hit_tokens", "Prompt tokens read from cached blocks (not computed)"),
                               ("prefix_cache_copied_blocks", "Shared partial prompt blocks copied when a choice "
                                                              "first wrote into them (copy-on-write)"),
                               ("preemptions", "Running requests that gave their KV-cache blocks back to older ones "
                                               "(read again when readmitted)"))
        }
        self.gauges = gauges
        if expert_counts is not None:
            registry.register(_ExpertLoad(expert_counts))

    def render(self) -> bytes:
        if self.gauges is not None:
            for name, value in self.gauges().items():
                self._gauges[name].set(value)
        return generate_latest(self.registry)
