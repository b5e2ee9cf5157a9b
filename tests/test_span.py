"""WriteSpan: the span layout, the split, dead letters and a manifest written last."""

import glob
import hashlib
import json
import os
from pathlib import Path

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline

from loopline.blueprint import parse_blueprint
from loopline.events import DeadLetter, DecisionEvent, ObservationEvent, refusal
from loopline.examples import PiiKeyMissing
from transforms.join import (
    DEFAULT,
    OBSERVED,
    ORPHAN,
    OUT_OF_WINDOW,
    JoinedDecision,
    UnmatchedObservation,
)
from transforms.manifest import (
    COUNT_NAMES,
    MANIFEST,
    alternative_windows_ms,
    build_manifest,
    listed_files,
)
from transforms.span import SpanInputs, WriteSpan
from transforms.span_commit import span_files
from transforms.span_stats import SpanStats
from transforms.split import is_eval

T0 = 1_793_534_400_000  # 2026-11-01T12:00:00Z
MINUTE = 60_000
HOUR = 3_600_000

PLAIN = parse_blueprint(
    "name: plain\nversion: 4\neval_fraction: 0.3\n"
    "features: [{name: n, type: int}, {name: user, type: string}]\n"
    "label: {name: y, observation: click, aggregation: max, window: 1h, backward_slack: 2m,"
    " default: 0}\n"
)


def _decision(i: int, t: int = T0) -> DecisionEvent:
    return DecisionEvent(f"d-{i}", "plain", t, {"n": i, "user": f"u{i}"})


def _joined(i: int, delays=(), out_of_window=()) -> JoinedDecision:
    status = OBSERVED if delays else DEFAULT
    offsets = tuple(delays) + tuple(out_of_window)
    return JoinedDecision(
        _decision(i), 1 if delays else 0, status, len(delays), tuple(delays), offsets
    )


def _observation(i: int, t: int) -> ObservationEvent:
    return ObservationEvent(f"d-{i}", t, {"click": 1})


def _run_span(tmp_path: Path, parts: dict, **kwargs) -> dict:
    out = str(tmp_path / "span")
    with TestPipeline() as p:
        pcolls = {
            name: p | f"Create[{name}]" >> beam.Create(values, reshuffle=False)
            for name, values in parts.items()
        }
        SpanInputs(**pcolls) | WriteSpan(out, PLAIN, **kwargs)
    return json.loads((tmp_path / "span" / MANIFEST).read_text())


def _small_span() -> dict:
    joined = [
        _joined(1, delays=(1 * MINUTE, 3 * MINUTE)),
        _joined(2, delays=(-1 * MINUTE,), out_of_window=(90 * MINUTE,)),
        _joined(3),
    ]
    return dict(
        joined=joined,
        unmatched=[
            UnmatchedObservation(ORPHAN, _observation(9, T0 + 5 * MINUTE)),
            UnmatchedObservation(OUT_OF_WINDOW, _observation(2, T0 + 90 * MINUTE)),
        ],
        duplicate_decisions=[_decision(1, T0 + 7)],
        duplicate_observations=[_observation(1, T0 + MINUTE)],
        # Another day's observation: counted, written nowhere, outside the event-time range.
        out_of_range_observations=[_observation(8, T0 + 30 * HOUR)],
        rejected_decisions=[refusal("bad_json", "decision", "{not json", "not valid JSON")],
        rejected_observations=[refusal("bad_time", "observation", '{"x":1}', "no time")],
        late_decisions=[],
        late_observations=[],
        raw_decisions=["line"] * 5,
        raw_observations=["line"] * 8,
    )


def _read_examples(pattern: str, compression: str = "GZIP") -> list[tf.train.Example]:
    files = sorted(glob.glob(pattern))
    if not files:
        return []
    dataset = tf.data.TFRecordDataset(files, compression_type=compression)
    return [tf.train.Example.FromString(record.numpy()) for record in dataset]


def _lines(pattern: str) -> list[dict]:
    return [
        json.loads(line) for f in sorted(glob.glob(pattern)) for line in open(f) if line.strip()
    ]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    """The span of ``_small_span``, written once: (span directory, manifest)."""
    root = tmp_path_factory.mktemp("small")
    return root / "span", _run_span(root, _small_span())


def _example_ids(examples: list[tf.train.Example]) -> set[str]:
    return {e.features.feature["decision_id"].bytes_list.value[0].decode() for e in examples}


def test_examples_are_split_by_the_stable_hash(small):
    span, _ = small
    train = _read_examples(str(span / "examples/train/*.tfrecord.gz"))
    eval_ = _read_examples(str(span / "examples/eval/*.tfrecord.gz"))
    assert _example_ids(train) | _example_ids(eval_) == {"d-1", "d-2", "d-3"}
    assert all(not is_eval(i, PLAIN.eval_fraction) for i in _example_ids(train))
    assert all(is_eval(i, PLAIN.eval_fraction) for i in _example_ids(eval_))


def test_examples_carry_their_labels(small):
    span, _ = small
    examples = _read_examples(str(span / "examples/*/*.tfrecord.gz"))
    labels = {
        e.features.feature["decision_id"].bytes_list.value[0]: e.features.feature[
            "y"
        ].int64_list.value[0]
        for e in examples
    }
    assert labels == {b"d-1": 1, b"d-2": 1, b"d-3": 0}


def test_unmatched_observations_are_written_with_their_reason(small):
    span, _ = small
    unmatched = _lines(str(span / "unmatched_observations/*.jsonl"))
    assert sorted((u["reason"], u["event"]["decision_id"]) for u in unmatched) == [
        ("orphan", "d-9"),
        ("out_of_window", "d-2"),
    ]


def test_dead_letters_are_written_with_reason_source_step_and_payload(small):
    span, _ = small
    rejected = _lines(str(span / "rejected/*.jsonl"))
    assert sorted(rejected, key=lambda r: r["source"]) == [
        {
            "reason": "bad_json",
            "source": "decision",
            "step": "ParseDecisions",
            "detail": "not valid JSON",
            "decision_id": None,
            "payload": "{not json",
        },
        {
            "reason": "bad_time",
            "source": "observation",
            "step": "ParseObservations",
            "detail": "no time",
            "decision_id": None,
            "payload": '{"x":1}',
        },
    ]


def test_manifest_counts_reconcile(small):
    span, manifest = small
    split = {
        name: len(_read_examples(str(span / f"examples/{name}/*.tfrecord.gz")))
        for name in ("train", "eval")
    }
    assert {k: manifest[k] for k in COUNT_NAMES} == {
        "decisions_in": 5,
        "examples_written": 3,
        "examples_observed": 2,
        "examples_default": 1,
        "duplicate_decisions": 1,
        "rejected_decisions": 1,
        "late_decisions": 0,
        "observations_in": 8,
        "observations_used": 3,
        "observations_out_of_window": 1,
        "observations_orphan": 1,
        "observations_late": 0,
        "observations_out_of_range": 1,
        "duplicate_observations": 1,
        "rejected_observations": 1,
        "late_observations": 0,
        "examples_train": split["train"],
        "examples_eval": split["eval"],
    }
    assert manifest["reconciles"] is True
    assert manifest["rejected_by_reason"] == {
        "decision": {"bad_json": 1},
        "observation": {"bad_time": 1},
    }


def test_manifest_records_blueprint_windows_and_event_time_range(small):
    _, manifest = small
    assert manifest["blueprint"] == PLAIN.summary()
    assert manifest["window"]["label_window"] == "1h"
    assert manifest["window"]["backward_slack_ms"] == 2 * MINUTE
    assert manifest["event_time_range"] == {
        "min": "2026-11-01T11:59:00.000Z",
        "max": "2026-11-01T13:30:00.000Z",
    }


def test_manifest_label_delays_and_alternative_windows(small):
    _, manifest = small
    # Delays -1m, 1m, 3m: nearest rank p50 is the 2nd, p90 and p99 the 3rd.
    assert manifest["label_delay"]["p50_ms"] == MINUTE
    assert manifest["label_delay"]["p99_ms"] == 3 * MINUTE
    windows = {w["window"]: w for w in manifest["alternative_windows"]["windows"]}
    assert manifest["alternative_windows"]["observations_of_known_decisions"] == 4
    assert windows["1h"]["share_counted"] == pytest.approx(3 / 4)
    assert windows["1h"]["is_label_window"] is True
    assert windows["2h"]["share_counted"] == pytest.approx(1.0)
    assert windows["15m"]["observations_counted"] == 3
    assert set(windows) == {"15m", "30m", "1h", "2h", "4h", "1d"}


def test_late_observations_are_counted_on_their_own_and_reconcile(tmp_path):
    parts = {name: [] for name in SpanInputs._fields}
    parts["unmatched"] = [UnmatchedObservation("late_observation", _observation(1, T0))]
    parts["raw_observations"] = ["line"]
    manifest = _run_span(tmp_path, parts)
    assert manifest["observations_late"] == 1 and manifest["observations_orphan"] == 0
    assert manifest["reconciles"] is True


def test_late_events_go_to_late_with_their_reason_and_are_counted(tmp_path):
    parts = {name: [] for name in SpanInputs._fields}
    backfill = DeadLetter(
        "late", "decision", "AssignEventTime", "published 2 h late", '{"decision_id":"d-old"}'
    )
    parts["late_decisions"] = [backfill]
    parts["late_observations"] = [
        DeadLetter("late", "observation", "AssignEventTime", "published 3 h late", "{}")
    ]
    parts["raw_decisions"], parts["raw_observations"] = ["line"], ["line"]
    manifest = _run_span(tmp_path, parts)
    late = _lines(str(tmp_path / "span" / "late" / "*.jsonl"))
    assert sorted((r["reason"], r["source"]) for r in late) == [
        ("late", "decision"),
        ("late", "observation"),
    ]
    assert not _lines(str(tmp_path / "span" / "rejected" / "*.jsonl"))
    assert (manifest["late_decisions"], manifest["late_observations"]) == (1, 1)
    assert manifest["rejected_decisions"] == 0 and manifest["reconciles"] is True
    assert len(manifest["files"]["late"]) == 1


def test_manifest_is_written_after_every_other_file(small):
    span, manifest = small
    written = [p for p in span.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert written and not [p for p in written if ".tmp" in p.name or ".temp" in str(p)]
    manifest_time = os.stat(span / MANIFEST).st_mtime_ns
    assert all(os.stat(p).st_mtime_ns <= manifest_time for p in written)


def test_manifest_lists_every_file_with_its_record_count(small):
    span, manifest = small
    assert listed_files(manifest) == span_files(str(span))
    for path, records in manifest["records_per_file"].items():
        if path.endswith(".tfrecord.gz"):
            assert len(_read_examples(path)) == records, path
        else:
            assert len(Path(path).read_text().splitlines()) == records, path


def test_reconciliation_fails_when_an_input_is_lost(tmp_path):
    parts = _small_span()
    parts["raw_decisions"] = ["line"] * 6  # one decision read but accounted for nowhere
    manifest = _run_span(tmp_path, parts)
    assert manifest["decisions_in"] == 6
    assert manifest["reconciles"] is False
    assert manifest["reconciliation"]["decisions"] is False


def test_empty_span_still_writes_layout_and_manifest(tmp_path):
    parts = {name: [] for name in SpanInputs._fields}
    manifest = _run_span(tmp_path, parts)
    assert manifest["reconciles"] is True
    assert all(manifest[name] == 0 for name in COUNT_NAMES)
    assert manifest["label_delay"]["p50_ms"] is None
    assert manifest["event_time_range"] == {"min": None, "max": None}
    for sub in ("examples/train", "examples/eval", "unmatched_observations", "rejected"):
        assert (tmp_path / "span" / sub).is_dir()


def test_num_shards_sets_the_file_count(tmp_path):
    parts = {name: [] for name in SpanInputs._fields}
    parts["joined"] = [_joined(i) for i in range(40)]
    manifest = _run_span(tmp_path, parts, num_shards=3)
    assert len(glob.glob(str(tmp_path / "span/examples/train/*.tfrecord.gz"))) == 3
    assert manifest["examples_train"] + manifest["examples_eval"] == 40
    assert len(_read_examples(str(tmp_path / "span/examples/*/*.tfrecord.gz"))) == 40


def test_split_is_a_stable_hash_of_the_decision_id():
    digest = hashlib.sha256(b"d-123").digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    assert is_eval("d-123", fraction + 1e-9) and not is_eval("d-123", fraction)
    share = sum(is_eval(f"d-{i}", 0.2) for i in range(20_000)) / 20_000
    assert 0.19 < share < 0.21


def test_pseudonymising_blueprint_without_key_fails_at_construction(blueprint):
    with pytest.raises(PiiKeyMissing, match="user_id"):
        WriteSpan("out", blueprint, key=None)


def test_label_delay_quantiles_are_nearest_rank():
    stats = SpanStats()
    stats.delays.update(range(1, 101))
    quantiles = stats.delay_quantiles()
    assert (quantiles["p50_ms"], quantiles["p90_ms"], quantiles["p99_ms"]) == (50, 90, 99)
    other = SpanStats()
    other.delays.update([1000] * 100)
    stats.merge(other)
    assert stats.delay_quantiles()["p50_ms"] == 100 and stats.delay_quantiles()["count"] == 200


def test_build_manifest_prices_alternative_windows_against_an_independent_count():
    offsets = [-3 * MINUTE, -MINUTE, 0, 10 * MINUTE, 59 * MINUTE, 2 * 60 * MINUTE, 30 * 60 * MINUTE]
    stats = SpanStats()
    stats.offsets_total = len(offsets)
    for w in alternative_windows_ms(PLAIN):
        stats.offsets_within[w] = sum(1 for o in offsets if -2 * MINUTE <= o <= w)
    manifest = build_manifest(stats, PLAIN, 0, {})
    shares = {
        w["window_ms"]: w["share_counted"] for w in manifest["alternative_windows"]["windows"]
    }
    assert shares[60 * MINUTE] == pytest.approx(4 / 7)
    assert shares[86_400_000] == pytest.approx(5 / 7)  # 30h is past a day
    assert manifest["alternative_windows"]["observations_of_known_decisions"] == 7


def test_join_api_doc_example_runs_as_written(tmp_path, monkeypatch, pii_key):
    """docs/library.md's "join as a library" code, executed verbatim: own source, label_fn,
    own sink, WriteSpan."""
    repo = Path(__file__).resolve().parent.parent
    text = (repo / "docs" / "library.md").read_text().split("# The join as a library", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "examples").symlink_to(repo / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/library.md", "exec"), {"__name__": "join_api_doc"})

    examples = _read_examples(str(tmp_path / "my-examples/part*"), compression="")
    labels = {
        e.features.feature["decision_id"].bytes_list.value[0]: e.features.feature[
            "clicked"
        ].int64_list.value[0]
        for e in examples
    }
    assert labels == {b"d-1": 1, b"d-2": 0}
    unmatched = _lines(str(tmp_path / "my-unmatched/*.jsonl"))
    assert [(u["reason"], u["event"]["decision_id"]) for u in unmatched] == [("orphan", "d-404")]
    manifest = json.loads((tmp_path / "my-span" / MANIFEST).read_text())
    assert manifest["reconciles"] and manifest["examples_written"] == 2
    assert manifest["observations_used"] == 3 and manifest["observations_orphan"] == 1


_STREAM_TAGS = list(SpanInputs._fields)


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> Path:
    """TestStream: two hours of joined decisions and dead letters, hourly output windows, two
    shards per window."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue

    stream = TestStream()
    first_hour = [
        TimestampedValue(_joined(i, delays=(MINUTE,) if i % 2 else ()), (T0 + i * MINUTE) / 1000)
        for i in range(3)
    ]
    second_hour = [
        TimestampedValue(_joined(10 + i), (T0 + HOUR + i * MINUTE) / 1000) for i in range(2)
    ]
    stream.add_elements(first_hour + second_hour, tag="joined")
    stream.add_elements(
        [TimestampedValue(UnmatchedObservation(ORPHAN, _observation(9, T0)), T0 / 1000)],
        tag="unmatched",
    )
    stream.add_elements(
        [TimestampedValue(refusal("bad_json", "decision", "{", "x"), (T0 + HOUR) / 1000)],
        tag="rejected_decisions",
    )
    for tag in _STREAM_TAGS:
        stream.advance_watermark_to_infinity(tag=tag)
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    out = tmp_path_factory.mktemp("stream")
    with TestPipeline(options=options) as p:
        pcolls = p | stream
        SpanInputs(**{tag: pcolls[tag] for tag in _STREAM_TAGS}) | WriteSpan(
            str(out), PLAIN, num_shards=2, output_window_ms=HOUR
        )
    return out


def _window_spans(root: Path) -> dict[str, dict]:
    return {m.parent.name: json.loads(m.read_text()) for m in sorted(root.glob(f"*/{MANIFEST}"))}


def test_streaming_writes_one_span_per_output_window_named_by_its_start(streamed):
    spans = _window_spans(streamed)
    assert list(spans) == ["2026-11-01T120000.000Z", "2026-11-01T130000.000Z"]
    assert spans["2026-11-01T120000.000Z"]["output_window"] == {
        "start": "2026-11-01T12:00:00.000Z",
        "end": "2026-11-01T13:00:00.000Z",
    }
    assert not any(":" in p.name for p in streamed.rglob("*"))


def test_each_window_span_has_the_standard_layout_and_reconciles(streamed):
    spans = _window_spans(streamed)
    first, second = spans.values()
    counts = ("examples_written", "examples_observed", "observations_orphan")
    assert tuple(first[k] for k in counts) == (3, 1, 1)
    assert (second["examples_written"], second["rejected_decisions"]) == (2, 1)
    assert first["reconciles"] and second["reconciles"]
    for name in spans:
        examples = _read_examples(str(streamed / name / "examples/*/*.tfrecord.gz"))
        assert len(examples) == spans[name]["examples_written"]


def test_each_window_manifest_lists_exactly_its_files_with_record_counts(streamed):
    for name, manifest in _window_spans(streamed).items():
        assert listed_files(manifest) == span_files(str(streamed / name))
        examples = sum(
            n for path, n in manifest["records_per_file"].items() if ".tfrecord.gz" in path
        )
        assert examples == manifest["examples_written"]
    assert not [p for p in streamed.rglob("*") if p.is_file() and ".temp" in str(p)]


def test_num_shards_is_honoured_per_window(streamed):
    for name, manifest in _window_spans(streamed).items():
        for output in ("train", "eval", "unmatched_observations", "rejected"):
            assert len(manifest["files"][output]) == 2, (name, output)
