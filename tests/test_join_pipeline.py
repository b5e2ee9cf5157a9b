"""pipelines.join_decisions end to end on simulated logs, checked against the raw files."""

import dataclasses
import glob
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from loopline import avro
from loopline.blueprint import load_blueprint
from loopline.events import parse_decision_json, parse_observation_json
from pipelines.join_decisions import JoinDecisionsOptions, resolve, run
from pipelines.launch import UsageError
from tests.join_fixtures import join_args, simulate_logs
from transforms.manifest import COUNT_NAMES, MANIFEST
from transforms.sources import ReadEvents, bigquery_row_to_record

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
KEY = "pipeline-test-key"


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return simulate_logs(tmp_path_factory.mktemp("logs"), seed=3, decisions=400)


_args = join_args


@pytest.fixture(scope="module")
def span(logs, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("span") / "notify" / "2026-11-01"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        manifest = run(_args(logs, output))
    return output, manifest


def _examples(pattern: str) -> list[tf.train.Example]:
    files = sorted(glob.glob(pattern))
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in dataset]


def _feature(example: tf.train.Example, name: str):
    feature = example.features.feature[name]
    return getattr(feature, feature.WhichOneof("kind")).value


def _raw_lines(pattern: str):
    """Every line of the files matching ``pattern``, in file-name order."""
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            yield from f


def _time_ms(value) -> int:
    if isinstance(value, int):
        return value
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:  # DESIGN.md: RFC 3339 *with a zone*
        raise ValueError(f"no zone in {value!r}")
    return int(moment.timestamp() * 1000)


def _independent_labels(logs: Path) -> dict[str, int]:
    """max(click) over observations within [td - 2m, td + 1h] of the earliest decision, else 0.

    Written from DESIGN.md with plain json, not the join: max ignores exact repeats, and the
    earliest decision of an id is its time.
    """
    decision_time: dict[str, int] = {}
    for line in _raw_lines(str(logs / "decisions-*.jsonl")):
        try:
            event = json.loads(line)
            if not isinstance(event["features"], dict) or event["decision_type"] != "notify":
                continue
            if not isinstance(event["decision_id"], str):
                continue
            decision_id, t = event["decision_id"], _time_ms(event["event_time"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        decision_time[decision_id] = min(t, decision_time.get(decision_id, t))
    labels = dict.fromkeys(decision_time, 0)
    for line in _raw_lines(str(logs / "observations-*.jsonl")):
        try:
            event = json.loads(line)
            decision_id, t = event["decision_id"], _time_ms(event["event_time"])
            click = event["observations"].get("click")
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        td = decision_time.get(decision_id)
        if td is not None and click is not None and td - 120_000 <= t <= td + 3_600_000:
            labels[decision_id] = max(labels[decision_id], int(click))
    return labels


def test_join_writes_the_design_layout_with_a_reconciled_manifest(span, logs):
    output, manifest = span
    assert glob.glob(str(output / "examples/train/*.tfrecord.gz"))
    assert glob.glob(str(output / "examples/eval/*.tfrecord.gz"))
    assert glob.glob(str(output / "unmatched_observations/*.jsonl"))
    assert glob.glob(str(output / "rejected/*.jsonl"))
    assert json.loads((output / MANIFEST).read_text()) == manifest
    assert manifest["reconciles"] is True
    assert all(isinstance(manifest[name], int) for name in COUNT_NAMES)
    assert manifest["decisions_in"] == (
        manifest["examples_written"]
        + manifest["duplicate_decisions"]
        + manifest["rejected_decisions"]
    )
    assert manifest["observations_in"] == (
        manifest["observations_used"] + manifest["observations_out_of_window"]
        + manifest["observations_orphan"] + manifest["duplicate_observations"]
        + manifest["rejected_observations"]
    )  # fmt: skip
    simulated = json.loads((logs / "simulation.json").read_text())["counts"]
    assert manifest["decisions_in"] == simulated["decision_lines"]
    assert manifest["observations_in"] == simulated["observation_lines"]
    assert manifest["examples_written"] == simulated["decisions"]
    assert manifest["rejected_decisions"] + manifest["rejected_observations"] > 0
    assert manifest["observations_orphan"] > 0 and manifest["duplicate_decisions"] > 0
    assert manifest["blueprint"]["name"] == "notify"
    assert manifest["counters"]["write_span.examples_train"] == manifest["examples_train"]
    rejected = [json.loads(line) for line in _raw_lines(str(output / "rejected/*.jsonl"))]
    assert len(rejected) == manifest["rejected_decisions"] + manifest["rejected_observations"]
    # DESIGN.md's record, plus the refusing step and (for scoring's) the decision id.
    shape = {"reason", "source", "step", "detail", "decision_id", "payload"}
    assert all(set(r) == shape for r in rejected)


def test_manifest_is_written_after_every_other_file(span):
    output, manifest = span
    files = [p for p in output.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert not [p for p in files if p.suffix == ".tmp" or "beam-temp" in str(p)]
    manifest_time = os.stat(output / MANIFEST).st_mtime_ns
    assert all(os.stat(p).st_mtime_ns <= manifest_time for p in files)
    assert sorted(f for fs in manifest["files"].values() for f in fs) == sorted(map(str, files))


def test_examples_match_labels_computed_independently_from_the_raw_files(span, logs):
    output, manifest = span
    examples = _examples(str(output / "examples/*/*.tfrecord.gz"))
    assert len(examples) == manifest["examples_written"]
    labels = {_feature(e, "decision_id")[0].decode(): _feature(e, "clicked")[0] for e in examples}
    expected = _independent_labels(logs)
    assert labels == expected
    assert sum(labels.values()) == manifest["examples_observed"] > 0
    raw_users = set()
    for line in _raw_lines(str(logs / "decisions-*.jsonl")):
        event = parse_decision_json(line)
        if hasattr(event, "features") and "user_id" in event.features:
            raw_users.add(str(event.features["user_id"]).encode())
    for example in examples:
        assert "email" not in example.features.feature
        assert _feature(example, "user_id")[0] not in raw_users
        assert len(_feature(example, "user_id")[0]) == 64


def test_split_is_stable_across_runs(span, logs, tmp_path, monkeypatch):
    output, manifest = span
    monkeypatch.setenv("LOOPLINE_PII_KEY", KEY)
    again = run(_args(logs, tmp_path / "again", "--num_shards", "2"))
    assert len(glob.glob(str(tmp_path / "again/examples/train/*.tfrecord.gz"))) == 2
    for split in ("train", "eval"):
        first = sorted(
            e.SerializeToString(deterministic=True)
            for e in _examples(str(output / f"examples/{split}/*"))
        )
        second = sorted(
            e.SerializeToString(deterministic=True)
            for e in _examples(str(tmp_path / f"again/examples/{split}/*"))
        )
        assert first == second
    assert {k: again[k] for k in COUNT_NAMES} == {k: manifest[k] for k in COUNT_NAMES}


def test_avro_input_gives_the_same_examples(span, logs, tmp_path, monkeypatch):
    output, manifest = span
    bp = load_blueprint(BLUEPRINT)
    for kind, parse in (("decision", parse_decision_json), ("observation", parse_observation_json)):
        lines = _raw_lines(str(logs / f"{kind}s-*.jsonl"))
        events = [e for line in lines if not hasattr(e := parse(line, bp), "reason")]
        with open(tmp_path / f"{kind}s.avro", "wb") as f:
            avro.write_events(f, kind, events)
    monkeypatch.setenv("LOOPLINE_PII_KEY", KEY)
    args = _args(tmp_path, tmp_path / "avro_span")
    args[1], args[3] = str(tmp_path / "decisions.avro"), str(tmp_path / "observations.avro")
    from_avro = run(args)
    assert from_avro["rejected_decisions"] == from_avro["rejected_observations"] == 0
    assert from_avro["examples_written"] == manifest["examples_written"]
    assert sorted(
        e.SerializeToString(deterministic=True)
        for e in _examples(str(tmp_path / "avro_span/examples/*/*"))
    ) == (
        sorted(
            e.SerializeToString(deterministic=True) for e in _examples(str(output / "examples/*/*"))
        )
    )


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("--blueprint", [], "--blueprint is required"),
        ("--decisions", [], "no decision input"),
        (None, ["--decisions_table", "p:d.t"], "give only one decision input"),
        (None, ["--num_shards", "zero"], "--num_shards"),
        (None, ["--format", "csv"], "--format"),
        (None, ["--allowed_lateness", "soon"], "--allowed_lateness"),
        (
            None,
            ["--decisions_subscription", "projects/p/subscriptions/s"],
            "only one decision input",
        ),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(drop, extra, message, tmp_path, capsys, pii_key):
    args = _args(tmp_path, tmp_path / "out") + extra
    if drop:
        i = args.index(drop)
        del args[i : i + 2]
    with pytest.raises(SystemExit) as info:
        run(args)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_pseudonymising_blueprint_without_key_fails_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOOPLINE_PII_KEY", raising=False)
    with pytest.raises(SystemExit) as info:
        run(_args(tmp_path, tmp_path / "out"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LOOPLINE_PII_KEY" in err
    assert not (tmp_path / "out").exists()


def test_resolve_refuses_bad_arguments_with_a_usage_error_not_an_exit(logs, tmp_path, pii_key):
    options = PipelineOptions(_args(logs, tmp_path / "out", "--num_shards", "0"))
    with pytest.raises(UsageError, match="--num_shards must be a whole number"):
        resolve(options.view_as(JoinDecisionsOptions), streaming=False)
    config = resolve(
        PipelineOptions(_args(logs, tmp_path / "out")).view_as(JoinDecisionsOptions), False
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.output = "elsewhere"


def test_input_pattern_matching_no_file_is_refused_before_the_pipeline_is_built(
    tmp_path, capsys, pii_key
):
    with pytest.raises(SystemExit) as info:
        run(_args(tmp_path, tmp_path / "out"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"join_decisions: error: --decisions '{tmp_path}/decisions-*.jsonl' matches no files"
    ]


def test_a_tfrecord_pattern_is_refused_the_join_reads_events(logs, tmp_path, capsys, pii_key):
    args = [a.replace("decisions-*.jsonl", "examples/*.tfrecord.gz") for a in _args(logs, tmp_path)]
    with pytest.raises(SystemExit) as info:
        run(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names TFRecord files: the join reads events" in err[0]


def test_streaming_needs_subscriptions(tmp_path, capsys, pii_key):
    with pytest.raises(SystemExit):
        run([*_args(tmp_path, tmp_path / "out"), "--streaming"])
    assert "--streaming reads" in capsys.readouterr().err


class _RecordingSource(beam.PTransform):
    """Stands in for a cloud source at the client boundary: records its arguments, and yields
    the given elements instead of calling BigQuery / Pub/Sub."""

    calls: list = []
    elements: dict = {}

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        _RecordingSource.calls.append(kwargs)

    def expand(self, pbegin):
        name = self.kwargs.get("table") or self.kwargs.get("subscription")
        return pbegin | beam.Create(_RecordingSource.elements.get(name, []))


def test_bigquery_tables_feed_the_same_join(span, logs, tmp_path, monkeypatch):
    """BigQuery is faked at the client boundary (ReadFromBigQuery); everything after it is real.

    Rows carry a TIMESTAMP as a datetime and the features / observations as JSON strings, the
    way BigQuery returns TIMESTAMP and JSON columns.
    """
    output, manifest = span
    bp = load_blueprint(BLUEPRINT)
    rows = {}
    for kind, parse, column in (
        ("decision", parse_decision_json, "features"),
        ("observation", parse_observation_json, "observations"),
    ):
        rows[f"p:logs.{kind}s"] = []
        for line in _raw_lines(str(logs / f"{kind}s-*.jsonl")):
            event = parse(line, bp)
            if hasattr(event, "reason"):
                continue
            row = event.to_dict()
            row["event_time"] = datetime.fromtimestamp(event.event_time_ms / 1000, timezone.utc)
            row[column] = json.dumps(row[column])
            rows[f"p:logs.{kind}s"].append(row)
    monkeypatch.setattr(_RecordingSource, "calls", [])
    monkeypatch.setattr(_RecordingSource, "elements", rows)
    monkeypatch.setattr(beam.io, "ReadFromBigQuery", _RecordingSource)
    monkeypatch.setenv("LOOPLINE_PII_KEY", KEY)
    args = [
        "--decisions_table", "p:logs.decisions", "--observations_table", "p:logs.observations",
        "--blueprint", str(BLUEPRINT), "--output", str(tmp_path / "bq"),
    ]  # fmt: skip
    from_tables = run(args)
    assert _RecordingSource.calls == [
        {"table": "p:logs.decisions"},
        {"table": "p:logs.observations"},
    ]
    assert from_tables["reconciles"] and from_tables["rejected_decisions"] == 0
    assert sorted(
        e.SerializeToString(deterministic=True)
        for e in _examples(str(tmp_path / "bq/examples/*/*"))
    ) == (
        sorted(
            e.SerializeToString(deterministic=True) for e in _examples(str(output / "examples/*/*"))
        )
    )


def test_pubsub_subscriptions_are_read_with_attributes_not_timestamp_attribute(monkeypatch):
    """Pub/Sub is faked at the client boundary: this checks the source is built with the
    subscription and message attributes; event time is read from the attribute by a DoFn that
    rejects a bad one (transforms.streaming), not by the source, which would fail the read."""
    monkeypatch.setattr(_RecordingSource, "calls", [])
    monkeypatch.setattr(beam.io, "ReadFromPubSub", _RecordingSource)
    source = ReadEvents("observation", subscription="projects/p/subscriptions/obs")
    assert source.parse_format == "pubsub" and source.is_streaming
    p = beam.Pipeline()
    _ = p | source
    assert _RecordingSource.calls == [
        {"subscription": "projects/p/subscriptions/obs", "with_attributes": True}
    ]


def test_file_format_is_detected_by_extension_or_forced():
    assert ReadEvents("decision", pattern="logs/d-*.avro").parse_format == "avro"
    assert ReadEvents("decision", pattern="logs/d-*.jsonl").parse_format == "json"
    assert ReadEvents("decision", pattern="logs/d-*", format="avro").parse_format == "avro"
    with pytest.raises(ValueError, match="exactly one"):
        ReadEvents("decision", pattern="a", table="b")
    with pytest.raises(ValueError, match="format"):
        ReadEvents("decision", pattern="a", format="csv")


def test_bigquery_rows_become_event_records():
    row = {"decision_id": "d", "event_time": datetime(2026, 11, 1, 12, 0, 0, 250_000),
           "features": '{"a": 1}', "observations": "not json"}  # fmt: skip
    record = bigquery_row_to_record(row)
    assert record["event_time"] == 1_793_534_400_250
    assert record["features"] == {"a": 1} and record["observations"] == "not json"
