"""`/metrics` in Prometheus format, under the names, labels and histogram buckets of vLLM's own
metrics (the buckets read from the engine, `Engine.metric_buckets`), for what dooly produces; plus
dooly's own token lateness (how late tokens went out against their predicted times)."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# fine bounds for lateness: the real-time target is a p99 of a few milliseconds
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics:
    def __init__(self, model_name: str, buckets: dict[str, list[float]], engine=None):
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = (model_name, "0")

        def gauge(name, doc, fn):
            g = Gauge(name, doc, labels, registry=r, multiprocess_mode="mostrecent")
            g.labels(*values).set_function(fn)

        def counter(name, doc, extra=()):
            c = Counter(name, doc, labels + list(extra), registry=r)
            return c if extra else c.labels(*values)

        def hist(name, doc, family):
            return Histogram(name, doc, labels, buckets=buckets[family], registry=r).labels(*values)

        self._engine = engine
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              lambda: self._engine.num_running if self._engine else 0)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              lambda: self._engine.num_waiting if self._engine else 0)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              lambda: self._engine.scheduler.kv_usage if self._engine else 0.0)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self._success = counter("vllm:request_success", "Count of successfully processed requests.",
                                ["finished_reason"])
        self._values = values
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         "time_to_first_token")
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        "inter_token_latency")
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Histogram of time_per_output_token_seconds per request.", "inter_token_latency")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        "request_latency")
        self.request_prompt = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                   "request_tokens")
        self.request_generation = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                       "request_tokens")
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                     "iteration_tokens")
        self.lateness_samples: list[float] = []  # every token's lateness (kept whole: exact percentiles)
        r.register(_LatenessCollector(self.lateness_samples, labels, values))

    def attach(self, engine) -> None:
        self._engine = engine

    # -- the engine's observer -------------------------------------------------------------------

    def step(self, s, engine) -> None:
        self.iteration_tokens.observe(s.batch.num_tokens)
        if s.preempted:
            self.preemptions.inc(len(s.preempted))

    def first_token(self, req, due: float) -> None:
        self.ttft.observe(due - req.arrival)
        self.prompt_tokens.inc(req.prompt_tokens)
        self.generation_tokens.inc()

    def token(self, req, interval: float) -> None:
        self.itl.observe(interval)
        self.generation_tokens.inc()

    def finished(self, req, reason: str) -> None:
        self._success.labels(*self._values, reason).inc()
        if reason == "abort":
            return
        self.e2e.observe(req.last_due - req.arrival)
        if req.emitted > 1:
            self.tpot.observe((req.last_due - req.first_due) / (req.emitted - 1))
        self.request_prompt.observe(req.prompt_tokens)
        self.request_generation.observe(req.emitted)

    def sent(self, lateness: float) -> None:
        self.lateness_samples.append(lateness)  # the hot path: a histogram is built from these when scraped

    # -- reading ---------------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def lag(self) -> dict:
        """Token lateness so far: count, p50, p99, max (seconds)."""
        xs = self.lateness_samples
        if not xs:
            return {"tokens": 0, "p50_s": None, "p99_s": None, "max_s": None}
        p50, p99 = np.percentile(xs, [50, 99])
        return {"tokens": len(xs), "p50_s": float(p50), "p99_s": float(p99), "max_s": float(max(xs))}


class _LatenessCollector:
    """dooly:token_lateness_seconds, a histogram built from the samples when scraped."""

    def __init__(self, samples: list, labels: list, values: tuple):
        self.samples, self.labels, self.values = samples, labels, values

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        xs = np.asarray(self.samples, dtype=float)
        counts = np.searchsorted(np.sort(xs), LATENESS_BUCKETS, side="right")
        family = HistogramMetricFamily("dooly:token_lateness_seconds", "How late tokens were sent against their "
                                       "predicted times (dooly serve's real-time lag).", labels=self.labels)
        family.add_metric(list(self.values), [(str(b), int(c)) for b, c in zip(LATENESS_BUCKETS, counts)]
                          + [("+Inf", len(xs))], float(xs.sum()))
        yield family
