"""`--timeline trace.json`: every rank's phases per step as Chrome trace events (chrome://tracing, Perfetto)."""
from __future__ import annotations

import json

# a peer's timings that are not its compute; "weights_wait" (dist.gather_overlap) is the part of its forward spent
# waiting for the last all-gather
COMM_TIMINGS = ("wait", "scatter", "scatter_overlap", "weights_wait")


def busy_s(timings: dict) -> float:
    """Seconds a peer computed in a step, from its RESULT's timings (phase -> [start, seconds])."""
    waited = timings.get("weights_wait", (0.0, 0.0))[1]
    return sum(v[1] for k, v in timings.items() if k not in COMM_TIMINGS) - waited


class Timeline:
    """Chrome trace events (chrome://tracing, Perfetto): one row per rank plus the coordinator's."""

    def __init__(self, path: str):
        self.path, self.events = path, []

    def add(self, name: str, rank: int, start_s: float, dur_s: float, step: int) -> None:
        self.events.append({"name": name, "ph": "X", "ts": start_s * 1e6, "dur": max(dur_s, 0) * 1e6,
                            "pid": 0, "tid": "coordinator" if rank < 0 else f"rank {rank}", "args": {"step": step}})

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)
