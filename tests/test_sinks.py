"""Event sinks: local JSON-lines files for real; Pub/Sub and BigQuery against fakes at the client
boundary (their real clients need a Google Cloud project)."""

import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.events import (
    DecisionEvent,
    ObservationEvent,
    parse_decision_json,
    parse_observation_json,
)
from loopline.sinks import (
    BigQuerySink,
    EventSink,
    JsonLinesSink,
    PubSubSink,
    SinkError,
    bigquery_row,
    row_id,
)

T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z


class FakeClock:
    def __init__(self, seconds: float = T0 / 1000):
        self.seconds = seconds

    def __call__(self) -> float:
        return self.seconds


def decision(i: int, padding: int = 0) -> DecisionEvent:
    return DecisionEvent(
        decision_id=f"d-{i}",
        decision_type="notify",
        event_time_ms=T0 + i,
        features={"tenure_days": i, "country": "KR", "note": "x" * padding},
        blueprint_version="1",
        decision=1,
        propensity=1.0,
    )


def observation(i: int) -> ObservationEvent:
    return ObservationEvent(f"d-{i}", T0 + 60_000 + i, {"click": 1})


def read_lines(directory: Path, prefix: str) -> list[str]:
    """Every line of the finished files of one kind, files in the order they were started."""
    paths = sorted(directory.glob(f"{prefix}-*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    lines = []
    for path in paths:
        text = path.read_text()
        assert text.endswith("\n"), f"{path.name} ends in a half line"
        lines.extend(text.splitlines())
    return lines


# ---------------------------------------------------------------------------------------------
# JsonLinesSink


def test_events_go_to_files_of_their_kind_renamed_when_the_sink_closes(tmp_path):
    clock = FakeClock()
    with JsonLinesSink(tmp_path, clock=clock) as sink:
        assert isinstance(sink, EventSink)
        sink.write(decision(1))
        sink.write(observation(1))
        sink.flush()
        assert list(tmp_path.glob("*.jsonl")) == []  # still in progress: readers see nothing
        assert len(list(tmp_path.glob("*.jsonl.inprogress"))) == 2
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "decisions-20261101T000000Z-00000.jsonl",
        "observations-20261101T000000Z-00001.jsonl",
    ]
    assert parse_decision_json(read_lines(tmp_path, "decisions")[0]) == decision(1)
    assert parse_observation_json(read_lines(tmp_path, "observations")[0]) == observation(1)


def test_a_file_rotates_before_it_would_pass_max_bytes(tmp_path):
    line_bytes = len(decision(0).to_json()) + 1
    with JsonLinesSink(tmp_path, max_bytes=3 * line_bytes) as sink:
        for _ in range(7):
            sink.write(decision(0))
    sizes = sorted(p.stat().st_size for p in tmp_path.glob("decisions-*.jsonl"))
    assert sizes == [line_bytes, 3 * line_bytes, 3 * line_bytes]


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path):
    with JsonLinesSink(tmp_path, max_bytes=100) as sink:
        sink.write(decision(1, padding=500))
        sink.write(decision(2, padding=500))
    assert len(read_lines(tmp_path, "decisions")) == 2
    assert len(list(tmp_path.glob("decisions-*.jsonl"))) == 2


def test_a_file_rotates_by_age_on_write_and_on_flush(tmp_path):
    clock = FakeClock()
    sink = JsonLinesSink(tmp_path, max_age_s=3600, clock=clock)
    sink.write(decision(1))
    clock.seconds += 3599
    sink.write(decision(2))  # same file: not an hour old yet
    clock.seconds += 1
    sink.write(decision(3))  # the first file is an hour old: a new one starts now
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        "decisions-20261101T000000Z-00000.jsonl"
    ]
    clock.seconds += 3600
    sink.flush()  # no write needed to finish an expired file
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        "decisions-20261101T000000Z-00000.jsonl",
        "decisions-20261101T010000Z-00001.jsonl",
    ]
    assert [json.loads(x)["decision_id"] for x in read_lines(tmp_path, "decisions")] == [
        "d-1",
        "d-2",
        "d-3",
    ]
    sink.close()
    assert list(tmp_path.glob("*.inprogress")) == []


def test_auto_flush_finishes_an_expired_file_without_further_writes(tmp_path):
    clock = FakeClock()
    sink = JsonLinesSink(tmp_path, max_age_s=60, clock=clock, auto_flush_s=0.01)
    sink.write(decision(1))
    clock.seconds += 60
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name for p in tmp_path.glob("*.jsonl")] == ["decisions-20261101T000000Z-00000.jsonl"]
    sink.close()
    assert not sink._flusher.is_alive()


def test_concurrent_writers_never_produce_half_lines_even_while_rotating(tmp_path):
    """Eight threads write through a sink that rotates every few KB while a reader keeps
    globbing ``*.jsonl``: every file the reader sees holds only whole, parsable lines, and after
    close every event is there exactly once."""
    sink = JsonLinesSink(tmp_path, max_bytes=4096)
    threads_n, per_thread = 8, 300
    done = threading.Event()
    problems = []

    def writer(t: int) -> None:
        for i in range(per_thread):
            n = t * per_thread + i
            sink.write(decision(n, padding=n % 97))
            sink.write(observation(n))

    def reader() -> None:
        while not done.is_set():
            for path in tmp_path.glob("*.jsonl"):
                text = path.read_text()
                if not text.endswith("\n"):
                    problems.append(f"{path.name} ends in a half line")
                for line in text.splitlines():
                    try:
                        json.loads(line)
                    except ValueError:
                        problems.append(f"{path.name}: {line[:40]}")

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    sink.close()
    done.set()
    watcher.join()

    assert problems == []
    decisions = [parse_decision_json(x) for x in read_lines(tmp_path, "decisions")]
    observations = [parse_observation_json(x) for x in read_lines(tmp_path, "observations")]
    total = threads_n * per_thread
    assert sorted(d.decision_id for d in decisions) == sorted(f"d-{n}" for n in range(total))
    assert len(observations) == total and all(isinstance(o, ObservationEvent) for o in observations)
    assert len(list(tmp_path.glob("decisions-*.jsonl"))) > 10  # it did rotate, many times
    assert all(p.stat().st_size <= 4096 for p in tmp_path.glob("*.jsonl"))
    assert sink.lines_written == {"decision": total, "observation": total}


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["decision", "observation", "raw"]),
            st.integers(0, 300),  # padding, so lines vary in size
            st.sampled_from([0, 0, 0, 1, 30, 61]),  # clock advance in seconds before the write
        ),
        max_size=40,
    ),
    max_bytes=st.integers(200, 2000),
)
def test_rotation_keeps_every_line_whole_and_in_order(tmp_path_factory, ops, max_bytes):
    directory = tmp_path_factory.mktemp("sink")
    clock = FakeClock()
    written = {"decisions": [], "observations": []}
    with JsonLinesSink(directory, max_bytes=max_bytes, max_age_s=60, clock=clock) as sink:
        for i, (kind, padding, advance) in enumerate(ops):
            clock.seconds += advance
            if kind == "raw":
                line = "{not json" + "y" * padding
                sink.write_raw("observation", line)
                written["observations"].append(line)
            elif kind == "decision":
                sink.write(decision(i, padding))
                written["decisions"].append(decision(i, padding).to_json())
            else:
                sink.write(observation(i))
                written["observations"].append(observation(i).to_json())
    for prefix, lines in written.items():
        assert read_lines(directory, prefix) == lines
        for path in directory.glob(f"{prefix}-*.jsonl"):
            lines_in_file = path.read_text().splitlines()
            assert len(lines_in_file) == 1 or path.stat().st_size <= max_bytes
    assert list(directory.glob("*.inprogress")) == []


def test_raw_lines_are_written_as_given_and_must_be_one_line(tmp_path):
    with JsonLinesSink(tmp_path) as sink:
        sink.write_raw("decision", '{"decision_id": 1')
        with pytest.raises(ValueError, match="line break"):
            sink.write_raw("decision", "a\nb")
        with pytest.raises(ValueError, match="kind"):
            sink.write_raw("label", "{}")
    assert read_lines(tmp_path, "decisions") == ['{"decision_id": 1']


def test_a_closed_sink_refuses_writes_and_files_never_collide(tmp_path):
    clock = FakeClock()
    with JsonLinesSink(tmp_path, clock=clock) as first:
        first.write(decision(1))
    second = JsonLinesSink(tmp_path, clock=clock)  # same stamp, same first sequence number
    second.write(decision(2))
    second.close()
    with pytest.raises(ValueError, match="closed"):
        second.write(decision(3))
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == [
        "decisions-20261101T000000Z-00000.jsonl",
        "decisions-20261101T000000Z-00001.jsonl",
    ]


def test_writer_id_goes_into_file_names(tmp_path):
    with JsonLinesSink(tmp_path, clock=FakeClock(), writer_id="host7") as sink:
        sink.write(observation(1))
    assert [p.name for p in tmp_path.glob("*.jsonl")] == [
        "observations-20261101T000000Z-host7-00000.jsonl"
    ]


# ---------------------------------------------------------------------------------------------
# Pub/Sub (fake publisher at the client boundary)


class FakePublisher:
    """Stands in for google.cloud.pubsub_v1.PublisherClient: records publish() calls and
    returns futures the test resolves, as the real client's batch threads would."""

    def __init__(self, fail_ids=()):
        self.calls = []
        self.fail_ids = set(fail_ids)
        self.stopped = False

    def publish(self, topic, data, **attrs):
        self.calls.append((topic, data, attrs))
        future = Future()
        if attrs["decision_id"] in self.fail_ids:
            future.set_exception(RuntimeError("deadline exceeded"))
        else:
            future.set_result(str(len(self.calls)))
        return future

    def stop(self):
        self.stopped = True


def test_pubsub_sink_publishes_json_with_event_time_attributes():
    """Fake publisher: the real one needs a Google Cloud project."""
    publisher = FakePublisher()
    sink = PubSubSink(publisher, "projects/p/topics/dec", "projects/p/topics/obs")
    sink.write(decision(1))
    sink.write(observation(1))
    sink.close()
    (t1, d1, a1), (t2, d2, a2) = publisher.calls
    assert t1 == "projects/p/topics/dec" and t2 == "projects/p/topics/obs"
    assert parse_decision_json(d1) == decision(1)
    assert parse_observation_json(d2) == observation(1)
    assert a1 == {
        "event_time": "2026-11-01T00:00:00.001Z",
        "decision_id": "d-1",
        "kind": "decision",
    }
    assert a2 == {
        "event_time": "2026-11-01T00:01:00.001Z",
        "decision_id": "d-1",
        "kind": "observation",
    }
    assert sink.published == 2
    assert not publisher.stopped  # not ours to stop


def test_pubsub_flush_raises_for_failed_messages_and_keeps_the_rest():
    """Fake publisher whose futures fail for one decision id."""
    publisher = FakePublisher(fail_ids={"d-2"})
    sink = PubSubSink(publisher, "projects/p/topics/dec", "projects/p/topics/obs")
    for i in range(4):
        sink.write(decision(i))
    with pytest.raises(SinkError, match="1 of 4 Pub/Sub messages failed") as raised:
        sink.flush()
    assert [event.decision_id for event, _ in raised.value.failures] == ["d-2"]
    assert sink.published == 3
    sink.flush()  # the failures were reported once; nothing is pending any more
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write(decision(9))


def test_pubsub_sink_builds_a_batching_publisher_when_given_none():
    """The real PublisherClient, built with anonymous credentials and never asked to send."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import pubsub_v1

    sink = PubSubSink(None, "projects/p/topics/dec", "projects/p/topics/obs",
                      credentials=AnonymousCredentials())  # fmt: skip
    assert isinstance(sink.publisher, pubsub_v1.PublisherClient)
    assert sink.publisher.batch_settings.max_messages == 100
    assert sink.publisher.batch_settings.max_latency == 0.05
    sink.close()


# ---------------------------------------------------------------------------------------------
# BigQuery (fake client at the client boundary)


class FakeBigQuery:
    """Stands in for google.cloud.bigquery.Client.insert_rows_json: records each request,
    returns per-row errors for rows whose decision_id is in ``bad_ids`` and raises on the
    first ``outages`` requests."""

    def __init__(self, bad_ids=(), outages=0):
        self.requests = []
        self.bad_ids = set(bad_ids)
        self.outages = outages

    def insert_rows_json(self, table, json_rows, row_ids=None):
        if self.outages:
            self.outages -= 1
            raise ConnectionError("503 backend unavailable")
        self.requests.append((table, list(json_rows), list(row_ids)))
        return [
            {"index": i, "errors": [{"reason": "invalid", "message": "bad row"}]}
            for i, row in enumerate(json_rows)
            if row["decision_id"] in self.bad_ids
        ]


def test_bigquery_sink_inserts_in_batches_with_stable_row_ids():
    """Fake BigQuery client: the real one needs a Google Cloud project."""
    client = FakeBigQuery()
    sink = BigQuerySink(client, "p.ds.decisions", "p.ds.observations", batch_size=3)
    for i in range(7):
        sink.write(decision(i))
    sink.write(observation(1))
    assert [len(rows) for _, rows, _ in client.requests] == [3, 3]  # sent as batches fill
    sink.close()
    assert [(table, len(rows)) for table, rows, _ in client.requests] == [
        ("p.ds.decisions", 3),
        ("p.ds.decisions", 3),
        ("p.ds.decisions", 1),
        ("p.ds.observations", 1),
    ]
    table, rows, ids = client.requests[0]
    assert rows[0] == bigquery_row(decision(0))
    assert json.loads(rows[0]["features"]) == decision(0).features  # a JSON column
    assert rows[0]["event_time"] == "2026-11-01T00:00:00.000Z"
    assert ids == [row_id(decision(i)) for i in range(3)]
    assert row_id(decision(1)) == row_id(decision(1))  # a re-delivery dedups in BigQuery
    assert len(set(row_id(decision(i)) for i in range(7)) | {row_id(observation(1))}) == 8
    assert sink.inserted == 8


def test_bigquery_row_errors_are_raised_or_reported():
    """Fake BigQuery client that refuses one row."""
    client = FakeBigQuery(bad_ids={"d-1"})
    sink = BigQuerySink(client, "p.ds.decisions", "p.ds.observations", batch_size=10)
    sink.write(decision(0))
    sink.write(decision(1))
    with pytest.raises(SinkError, match="refused 1 of 2 rows") as raised:
        sink.flush()
    assert raised.value.failures[0][0]["decision_id"] == "d-1"
    assert sink.inserted == 1

    reported = []
    sink = BigQuerySink(
        client, "p.ds.decisions", "p.ds.observations", on_row_errors=reported.extend
    )
    sink.write(decision(1))
    sink.close()
    assert [row["decision_id"] for row, _ in reported] == ["d-1"]


def test_bigquery_rows_stay_buffered_when_the_request_fails():
    """Fake BigQuery client that is unavailable once: the retry carries the same insert ids."""
    client = FakeBigQuery(outages=1)
    sink = BigQuerySink(client, "p.ds.decisions", "p.ds.observations", batch_size=10)
    sink.write(decision(1))
    with pytest.raises(ConnectionError):
        sink.flush()
    sink.flush()
    assert client.requests == [
        ("p.ds.decisions", [bigquery_row(decision(1))], [row_id(decision(1))])
    ]
