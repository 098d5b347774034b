"""Gateway metrics in the Prometheus text exposition format (GET /metrics)."""
from __future__ import annotations

import collections
import math

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


def _num(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ("+Inf" if v > 0 else "NaN")


class Metrics:
    def __init__(self):
        self.requests = collections.Counter()          # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode_rate = Histogram(RATE_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, int(status))] += 1

    def finished(self, gen) -> None:
        """Account a generation that ran (whatever its outcome)."""
        self.prompt_tokens += len(gen.prompt)
        self.reused_tokens += gen.reused
        self.generated_tokens += len(gen.generated)
        if gen.ttft is not None:
            self.ttft.observe(gen.ttft)
        if gen.decode_rate is not None:
            self.decode_rate.observe(gen.decode_rate)

    def render(self, *, pool, scheduler) -> str:
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        metric("ds4tp_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'ds4tp_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())])
        metric("ds4tp_prompt_tokens_total", "counter", "Prompt tokens of generations.",
               [f"ds4tp_prompt_tokens_total {self.prompt_tokens}"])
        metric("ds4tp_prompt_tokens_reused_total", "counter",
               "Prompt tokens taken from a cached sequence state instead of prefilled.",
               [f"ds4tp_prompt_tokens_reused_total {self.reused_tokens}"])
        metric("ds4tp_generation_tokens_total", "counter", "Generated (sampled) tokens.",
               [f"ds4tp_generation_tokens_total {self.generated_tokens}"])
        metric("ds4tp_time_to_first_token_seconds", "histogram",
               "Time from request arrival to the first sampled token.",
               self.ttft.lines("ds4tp_time_to_first_token_seconds"))
        metric("ds4tp_decode_tokens_per_second", "histogram",
               "Per-request decode rate after the first token.",
               self.decode_rate.lines("ds4tp_decode_tokens_per_second"))
        metric("ds4tp_queue_depth", "gauge", "Requests waiting for a sequence slot.",
               [f"ds4tp_queue_depth {scheduler.queue_depth}"])
        metric("ds4tp_active_sequences", "gauge", "Requests being prefilled or decoded.",
               [f"ds4tp_active_sequences {len(scheduler.active)}"])
        metric("ds4tp_workers_healthy", "gauge", "1 if every rank is ready in one process group.",
               [f"ds4tp_workers_healthy {int(pool.healthy)}"])
        metric("ds4tp_worker_up", "gauge", "1 if the rank answers health probes.",
               [f'ds4tp_worker_up{{rank="{r.rank}"}} {int(r.reachable)}' for r in pool.ranks])
        metric("ds4tp_worker_step_seconds", "summary", "Model time of prefill/decode steps per rank.",
               [line for r in pool.ranks for line in (
                   f'ds4tp_worker_step_seconds_sum{{rank="{r.rank}"}} {_num(r.step_s)}',
                   f'ds4tp_worker_step_seconds_count{{rank="{r.rank}"}} {r.steps}')])
        n, t = pool.decode_round_trip
        metric("ds4tp_decode_round_trip_seconds", "summary",
               "Decode steps as the gateway sees them: sent to every rank until all replied.",
               [f"ds4tp_decode_round_trip_seconds_sum {_num(t)}", f"ds4tp_decode_round_trip_seconds_count {n}"])
        metric("ds4tp_worker_decode_seconds", "summary",
               "Decode steps only, per rank: the model's time (part=forward) and sampling's.",
               [line for r in pool.ranks for line in (
                   f'ds4tp_worker_decode_seconds_sum{{rank="{r.rank}",part="forward"}} {_num(r.decode_forward_s)}',
                   f'ds4tp_worker_decode_seconds_sum{{rank="{r.rank}",part="sample"}} {_num(r.decode_sample_s)}',
                   f'ds4tp_worker_decode_seconds_count{{rank="{r.rank}"}} {r.decode_steps}')])
        metric("ds4tp_worker_sample_seconds", "summary",
               "Sampling time (logits to token, logprobs) of prefill/decode steps per rank.",
               [line for r in pool.ranks for line in (
                   f'ds4tp_worker_sample_seconds_sum{{rank="{r.rank}"}} {_num(r.sample_s)}',
                   f'ds4tp_worker_sample_seconds_count{{rank="{r.rank}"}} {r.steps}')])
        return "\n".join(out) + "\n"
