"""The runner server's Prometheus metrics (GET /metrics): jobs by state, the queue's length, and for each job
that trains now its throughput, loss and progress. Read from the store at each scrape: nothing is kept in memory
between scrapes, so two servers over one store say the same thing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from jobs.jobdir import TRAINING, JobState
from runner.store import Store


class _Jobs:
    def __init__(self, store: Store):
        self.store = store

    def describe(self):
        return []  # no sample at registration: a scrape is the only time the store is read

    def collect(self):
        counts = self.store.counts()
        by_state = GaugeMetricFamily("runner_jobs", "Jobs in the store, by state.", labels=["state"])
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily("runner_queue_length", "Jobs waiting in the queue (QUEUED).",
                                value=counts[JobState.QUEUED])
        families = {
            "samples_per_s": GaugeMetricFamily("runner_job_samples_per_second",
                                               "Training samples a second at the job's latest step.",
                                               labels=["job", "name"]),
            "tokens_per_s": GaugeMetricFamily("runner_job_tokens_per_second",
                                              "Training tokens a second at the job's latest step.",
                                              labels=["job", "name"]),
            "loss": GaugeMetricFamily("runner_job_loss", "Training loss at the job's latest step.",
                                      labels=["job", "name"]),
            "step": GaugeMetricFamily("runner_job_step", "The job's latest training step.", labels=["job", "name"]),
        }
        for state in TRAINING:
            for job in self.store.list(state=state, limit=100_000):
                progress = job.to_json()["progress"] or {}
                for key, family in families.items():
                    if progress.get(key) is not None:
                        family.add_metric([job.id, job.name], float(progress[key]))
        yield from families.values()


def exposition(store: Store) -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Jobs(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST
