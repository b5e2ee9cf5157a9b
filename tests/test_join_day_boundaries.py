"""Day boundaries in batch: ``--observations_from`` / ``--observations_until`` (issue 12.6).

Two simulated days; the join of day D reads D's decisions and both days' observation files,
as the daily DAG stages them, with the range [D 00:00, D+1 00:00). It must write the same
examples as a join that reads only the observations of D's label horizon, and must not count
the next day's own observations as D's orphans: they are ``observations_out_of_range``. The
expected counts are computed here from the raw files with the event parser, not the join.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import tensorflow as tf

from loopline.blueprint import load_blueprint
from loopline.events import (
    DecisionEvent,
    ObservationEvent,
    parse_decision_json,
    parse_event_time,
    parse_observation_json,
)
from loopline.simulate import FaultRates, Simulator
from pipelines.join_decisions import run
from tests.conftest import EXAMPLE_BLUEPRINT
from transforms.manifest import MANIFEST

DAY_MS = 86_400_000
D = parse_event_time("2026-11-01T00:00:00Z")
KEY = "day-boundary-test-key"
RANGE = ["--observations_from", "2026-11-01T00:00:00Z", "--observations_until", "2026-11-02T00:00:00Z"]  # fmt: skip


def _lines(pattern: str) -> list[str]:
    return [line for path in sorted(glob.glob(pattern)) for line in Path(path).read_text().splitlines()]  # fmt: skip


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


class Logs:
    """Two days of simulated logs, re-cut the way the DAG sees them: D's decisions, and one
    observation file per day of event time (malformed lines stay with day D)."""

    def __init__(self, root: Path):
        raw = root / "raw"
        faults = FaultRates(duplicate=0.05, orphan=0.08, malformed=0.03)
        Simulator(load_blueprint(EXAMPLE_BLUEPRINT), seed=12, faults=faults).run(
            raw, decisions=500, days=2, start_ms=D
        )
        self.decisions = [parse_decision_json(line) for line in _lines(f"{raw}/decisions-*.jsonl")]
        self.day_decisions = [
            line
            for line, event in zip(_lines(f"{raw}/decisions-*.jsonl"), self.decisions, strict=True)
            if not isinstance(event, DecisionEvent) or event.event_time_ms < D + DAY_MS
        ]
        self.observation_lines = _lines(f"{raw}/observations-*.jsonl")
        self.observations = [parse_observation_json(line) for line in self.observation_lines]
        by_day: dict[str, list[str]] = {"2026-11-01": [], "2026-11-02": []}
        for line, event in zip(self.observation_lines, self.observations, strict=True):
            late = isinstance(event, ObservationEvent) and event.event_time_ms >= D + DAY_MS
            by_day["2026-11-02" if late else "2026-11-01"].append(line)
        self.decisions_glob = str(
            _write(root / "2026-11-01" / "decisions.jsonl", self.day_decisions)
        )
        for day, lines in by_day.items():
            _write(root / "staged" / day / "observations.jsonl", lines)
        self.observations_glob = str(root / "staged" / "*" / "observations.jsonl")
        # The reference input: only what can count toward a label of day D's decisions.
        horizon = [
            line
            for line, event in zip(self.observation_lines, self.observations, strict=True)
            if isinstance(event, ObservationEvent)
            and D - 120_000 <= event.event_time_ms <= D + DAY_MS + 3_600_000
        ]
        self.horizon_glob = str(_write(root / "horizon" / "observations.jsonl", horizon))

    def decision_ids(self, first_day: bool) -> set[str]:
        return {
            d.decision_id
            for d in self.decisions
            if isinstance(d, DecisionEvent) and (d.event_time_ms < D + DAY_MS) == first_day
        }

    def unique_unmatched(self) -> list[ObservationEvent]:
        """Observations of no decision of day D, exact repeats once (as the join dedups)."""
        ours = self.decision_ids(first_day=True)
        seen, out = set(), []
        for o in self.observations:
            if not isinstance(o, ObservationEvent) or o.decision_id in ours:
                continue
            identity = (o.decision_id, o.event_time_ms, json.dumps(o.observations, sort_keys=True))
            if identity not in seen:
                seen.add(identity)
                out.append(o)
        return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Logs:
    return Logs(tmp_path_factory.mktemp("two_days"))


def _join(logs: Logs, output: Path, observations: str, *extra: str) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        return run(
            [
                "--decisions", logs.decisions_glob, "--observations", observations,
                "--blueprint", str(EXAMPLE_BLUEPRINT), "--output", str(output), *extra,
            ]
        )  # fmt: skip


@pytest.fixture(scope="module")
def ranged(logs, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("ranged") / "span"
    return output, _join(logs, output, logs.observations_glob, *RANGE)


@pytest.fixture(scope="module")
def reference(logs, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("reference") / "span"
    return output, _join(logs, output, logs.horizon_glob)


def _examples(span: Path) -> dict[str, dict]:
    """Every example of a span (both splits) as ``{decision_id: {feature: values}}``."""
    files = sorted(glob.glob(str(span / "examples" / "*" / "*.tfrecord.gz")))
    examples = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        values = {
            name: list(getattr(f, f.WhichOneof("kind")).value) for name, f in features.items()
        }
        examples[values["decision_id"][0].decode()] = values
    return examples


def _unmatched(span: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(str(span / "unmatched_observations" / "*.jsonl"))]


def test_ranged_join_writes_the_examples_of_the_label_horizon_join(ranged, reference, logs):
    examples = _examples(ranged[0])
    assert set(examples) == logs.decision_ids(first_day=True)
    assert len(examples) > 200
    assert examples == _examples(reference[0])


def test_next_days_own_observations_are_not_orphans(ranged, logs):
    next_day = logs.decision_ids(first_day=False)
    unmatched = _unmatched(ranged[0])
    assert not [u for u in unmatched if u["event"]["decision_id"] in next_day]
    expected_orphans = [
        o for o in logs.unique_unmatched() if o.event_time_ms < D + DAY_MS and o.decision_id not in next_day
    ]  # fmt: skip
    assert ranged[1]["observations_orphan"] == len(expected_orphans) > 0
    assert sorted(
        u["event"]["decision_id"] for u in unmatched if u["reason"] == "orphan"
    ) == sorted(o.decision_id for o in expected_orphans)


def test_observations_outside_the_range_are_counted_out_of_range_and_reconcile(ranged, logs):
    manifest = ranged[1]
    expected = [o for o in logs.unique_unmatched() if o.event_time_ms >= D + DAY_MS]
    assert manifest["observations_out_of_range"] == len(expected) > 50
    assert manifest["observations_in"] == len(logs.observation_lines)
    assert manifest["reconciles"] is True
    assert manifest["observation_range"] == {
        "from": "2026-11-01T00:00:00.000Z",
        "until": "2026-11-02T00:00:00.000Z",
    }
    assert json.loads((ranged[0] / MANIFEST).read_text()) == manifest


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--observations_from", "2026-11-01"], "--observations_from"),
        (["--observations_until", "2026-11-01T00:00:00"], "--observations_until"),
        (RANGE[:2] + ["--observations_until", "2026-10-31T00:00:00Z"], "must be later than"),
    ],
)
def test_bad_observation_range_exits_2_with_one_line(extra, message, logs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _join(logs, tmp_path / "out", logs.observations_glob, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("join_decisions: error:") and message in err[0]
