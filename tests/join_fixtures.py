"""What the join's pipeline-level suites share: simulated logs with faults in every category,
and the join's command line over them."""

from __future__ import annotations

from pathlib import Path

from loopline.blueprint import load_blueprint
from loopline.simulate import FaultRates, Simulator
from tests.conftest import EXAMPLE_BLUEPRINT

START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def simulate_logs(out: Path, seed: int, decisions: int) -> Path:
    """One day of simulated logs with more faults than the defaults, so every output has
    something: duplicates, orphans and malformed lines."""
    faults = FaultRates(duplicate=0.05, orphan=0.05, malformed=0.03)
    Simulator(load_blueprint(EXAMPLE_BLUEPRINT), seed=seed, faults=faults).run(
        out, decisions=decisions, days=1, start_ms=START_MS
    )
    return out


def join_args(logs: Path, output: Path, *extra: str) -> list[str]:
    """``pipelines.join_decisions`` arguments over ``simulate_logs`` output."""
    return [
        "--decisions", str(logs / "decisions-*.jsonl"),
        "--observations", str(logs / "observations-*.jsonl"),
        "--blueprint", str(EXAMPLE_BLUEPRINT),
        "--output", str(output),
        *extra,
    ]  # fmt: skip
