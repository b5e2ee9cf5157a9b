"""The streaming join against a real Pub/Sub (the SDK's emulator), and parity with batch.

One scenario, published in real time with ``PubSubSink`` (event time as an attribute) to the
emulator while ``python -m pipelines.join_decisions --streaming`` runs on the DirectRunner as a
subprocess, with the faults of at-least-once delivery and real clients: a decision published
twice, an exact repeat of an observation, an orphan, a malformed message, a missing and an
unparsable event-time attribute, an observation published late but within the allowed
lateness, a decision redelivered by Pub/Sub after its example was written (a seek replays it
with its original publish time), a producer retry of a decision after that, a backfill an
hour old, and a decision after all of that (the job must not stall). The same payloads then go
through the batch job as JSON lines.

The blueprint's label window is 6 s (slack 2 s), the allowed lateness 6 s, the output window
10 s: a decision's session ends 14 s after its last event and is written about 28 s later.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf
from google.cloud import pubsub_v1
from google.protobuf import timestamp_pb2

from loopline.events import DecisionEvent, ObservationEvent, format_event_time
from loopline.sinks import PubSubSink
from pipelines.join_decisions import run

REPO = Path(__file__).resolve().parent.parent
KEY = "emulator-test-key"
LATENESS = "6s"
SECOND = 1000
HOUR = 3600 * SECOND
FINISH_TIMEOUT_S = 200

pytestmark = pytest.mark.slow

FEATURES = {
    "user_id": "u-1",
    "tenure_days": 30,
    "country": "KR",
    "platform": "ios",
    "hour_of_day": 12,
    "sends_last_7d": 2,
    "open_rate_30d": 0.25,
    "recent_clicks": [1.0, 0.0],
    "topics": ["news"],
    "click_rate_90d": 0.12,
    "favourite_topic": "news",
    "favourite_topic_match": 1,
    "email": "someone@example.com",
}


def _decision(decision_id: str, at: int) -> DecisionEvent:
    return DecisionEvent(decision_id, "notify", at, FEATURES, model_id="notify-1", propensity=0.9)


def _observation(decision_id: str, at: int, click: int = 1) -> ObservationEvent:
    return ObservationEvent(decision_id, at, {"click": click})


def _short_blueprint(path: Path) -> Path:
    text = (REPO / "examples" / "notify.yaml").read_text()
    text = text.replace("window: 1h", "window: 6s").replace(
        "backward_slack: 2m", "backward_slack: 2s"
    )
    path.write_text(text)
    return path


class Publisher:
    """Publishes the scenario and remembers every payload delivered to the job."""

    def __init__(self, decisions_topic: str, observations_topic: str):
        self.client = pubsub_v1.PublisherClient()
        self.sink = PubSubSink(self.client, decisions_topic, observations_topic)
        self.topics = {"decision": decisions_topic, "observation": observations_topic}
        self.payloads = {"decision": [], "observation": []}  # what the batch job reads
        self.deliveries = 0

    def event(self, event) -> None:
        kind = "decision" if isinstance(event, DecisionEvent) else "observation"
        self.sink.write(event)
        self.sink.flush()
        self.payloads[kind].append(event.to_json())
        self.deliveries += 1

    def raw(self, kind: str, data: str, **attributes) -> None:
        self.client.publish(self.topics[kind], data.encode(), **attributes).result(timeout=30)
        self.payloads[kind].append(data)
        self.deliveries += 1


def _wait_until_reading(subscriber, subscription: str, timeout_s: float = 180) -> None:
    """Returns once the job takes messages from ``subscription``: a message left there is
    pulled by the job, not by this probe (which hands back what it gets)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=5)
        if not response.received_messages:
            return
        subscriber.modify_ack_deadline(
            subscription=subscription,
            ack_ids=[m.ack_id for m in response.received_messages],
            ack_deadline_seconds=0,
        )
        time.sleep(2)
    pytest.fail(f"the streaming job did not read {subscription} within {timeout_s} s")


def _sleep_until(moment_ms: int) -> None:
    time.sleep(max(0.0, moment_ms / 1000 - time.time()))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _manifests(output: Path) -> list[dict]:
    paths = glob.glob(str(output / "**" / "manifest*.json"), recursive=True)
    return [json.loads(Path(p).read_text()) for p in sorted(paths)]


def _accounted(manifests: list[dict]) -> int:
    return sum(m["decisions_in"] + m["observations_in"] for m in manifests)


def _lines(output: Path, directory: str) -> list[dict]:
    paths = glob.glob(str(output / "**" / directory / "*.jsonl"), recursive=True)
    return [json.loads(line) for p in sorted(paths) for line in Path(p).read_text().splitlines()]


def _examples(output: Path) -> list[tf.train.Example]:
    paths = sorted(
        glob.glob(str(output / "**" / "examples" / "*" / "*.tfrecord.gz"), recursive=True)
    )
    dataset = tf.data.TFRecordDataset(paths, compression_type="GZIP")
    return [tf.train.Example.FromString(r.numpy()) for r in dataset]


def _summary(example: tf.train.Example) -> tuple[str, int, str]:
    f = example.features.feature
    return (
        f["decision_id"].bytes_list.value[0].decode(),
        int(f["clicked"].int64_list.value[0]),
        f["join_status"].bytes_list.value[0].decode(),
    )


@pytest.fixture(scope="module")
def runs(pubsub_emulator, tmp_path_factory):
    """Publishes the scenario to the streaming job; returns (streaming output, batch output,
    publisher) once every delivered message is accounted for in a manifest."""
    root = tmp_path_factory.mktemp("emulator-join")
    blueprint = _short_blueprint(root / "notify-short.yaml")
    # Pub/Sub redelivers only what was not acked; a seek on a subscription that keeps acked
    # messages replays them with their original publish time, which is what a redelivery is.
    decisions_topic, decisions_sub = pubsub_emulator.topic_and_subscription(
        "decisions", retain_acked_messages=True
    )
    observations_topic, observations_sub = pubsub_emulator.topic_and_subscription("observations")
    subscriber = pubsub_v1.SubscriberClient()
    publisher = Publisher(decisions_topic, observations_topic)
    stream_out = root / "stream"
    log = open(root / "job.log", "wb")  # noqa: SIM115 - closed below
    job = subprocess.Popen(
        [
            sys.executable, "-m", "pipelines.join_decisions", "--streaming",
            "--decisions_subscription", decisions_sub,
            "--observations_subscription", observations_sub,
            "--blueprint", str(blueprint), "--output", str(stream_out),
            "--allowed_lateness", LATENESS, "--output_window", "10s",
        ],
        env={**os.environ, "LOOPLINE_PII_KEY": KEY},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        # The unparsable attribute doubles as the probe that the job is reading.
        bad_attribute = _decision("d-bad-time", _now_ms())
        publisher.raw("decision", bad_attribute.to_json(), event_time="yesterday")
        _wait_until_reading(subscriber, decisions_sub)
        t = _now_ms()
        publisher.event(_decision("d1", t))
        publisher.event(_decision("d1", t))  # published twice
        publisher.event(_decision("d3", t))
        publisher.event(_observation("d1", t))
        publisher.event(_observation("d-404", t))  # orphan
        publisher.raw("decision", "{not json", event_time=format_event_time(t))
        publisher.raw("observation", _observation("d3", t).to_json())  # no event_time
        publisher.event(_decision("d9", t - HOUR))  # backfill: an hour old
        publisher.event(_observation("d9", t - HOUR + SECOND))
        _sleep_until(t + SECOND)
        seek_to = _now_ms()
        _sleep_until(t + 2 * SECOND)
        publisher.event(_decision("d2", t + 2 * SECOND))  # the decision Pub/Sub will redeliver
        _sleep_until(t + 3 * SECOND)
        repeat = _observation("d1", t + 3 * SECOND, click=0)
        publisher.event(repeat)
        publisher.event(repeat)  # an exact repeat
        _sleep_until(t + 8 * SECOND)
        publisher.event(_observation("d3", t + 4 * SECOND))  # 4 s late, within the lateness
        # d2's session ends 14 s after its event; well after that, Pub/Sub redelivers it.
        _sleep_until(t + 22 * SECOND)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromMilliseconds(seek_to)
        subscriber.seek(request={"subscription": decisions_sub, "time": stamp})
        publisher.deliveries += 1
        publisher.event(_decision("d2", t + 22 * SECOND))  # a producer's retry, later
        publisher.event(_observation("d2", t + 22 * SECOND))  # outside d2's window
        publisher.event(_decision("d5", t + 22 * SECOND))  # after all that: no stall
        publisher.event(_observation("d5", t + 23 * SECOND))
        publisher.sink.close()
        deadline = time.time() + FINISH_TIMEOUT_S
        while time.time() < deadline and job.poll() is None:
            if _accounted(_manifests(stream_out)) >= publisher.deliveries:
                break
            time.sleep(2)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            job.wait(timeout=30)
        log.close()
        subscriber.close()
    job_log = (root / "job.log").read_text(errors="replace")
    assert _accounted(_manifests(stream_out)) == publisher.deliveries, job_log[-3000:]

    logs = root / "logs"
    logs.mkdir()
    for kind, payloads in publisher.payloads.items():
        (logs / f"{kind}s.jsonl").write_text("".join(p + "\n" for p in payloads))
    batch_out = root / "batch"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        run(
            [
                "--decisions", str(logs / "decisions.jsonl"),
                "--observations", str(logs / "observations.jsonl"),
                "--blueprint", str(blueprint), "--output", str(batch_out),
                "--allowed_lateness", LATENESS,
            ]
        )  # fmt: skip
    return stream_out, batch_out, publisher


def test_no_decision_is_written_twice_and_the_job_does_not_stall(runs):
    stream_out, _, _ = runs
    ids = [_summary(e)[0] for e in _examples(stream_out)]
    assert sorted(ids) == ["d1", "d2", "d3", "d5"]


def test_streaming_labels_match_batch_for_every_decision_within_lateness(runs):
    stream_out, batch_out, _ = runs
    streamed = {s[0]: s[1:] for s in map(_summary, _examples(stream_out))}
    batch = {s[0]: s[1:] for s in map(_summary, _examples(batch_out))}
    # Batch reads the payloads alone: the backfill and the bad attribute join there too.
    assert set(batch) == set(streamed) | {"d9", "d-bad-time"}
    assert streamed == {d: batch[d] for d in streamed}
    assert streamed == {
        "d1": (1, "observed"),
        "d2": (0, "default"),
        "d3": (1, "observed"),
        "d5": (1, "observed"),
    }


def test_every_delivered_message_is_counted_in_exactly_one_place(runs):
    stream_out, _, publisher = runs
    manifests = _manifests(stream_out)
    # Duplicates and the observations a label was computed from are counts, not files.
    counted = sum(
        m["duplicate_decisions"] + m["duplicate_observations"] + m["observations_used"]
        for m in manifests
    )
    in_files = (
        len(_examples(stream_out))
        + len(_lines(stream_out, "unmatched_observations"))
        + len(_lines(stream_out, "rejected"))
        + len(_lines(stream_out, "late"))
    )
    assert in_files + counted == publisher.deliveries
    assert all(m["reconciles"] for m in manifests), [m.get("reconciliation") for m in manifests]


def test_redelivered_and_repeated_events_are_duplicates(runs):
    stream_out, _, _ = runs
    manifests = _manifests(stream_out)
    # d1 published twice, d2 redelivered by the seek and retried by its producer.
    assert sum(m["duplicate_decisions"] for m in manifests) == 3
    assert sum(m["duplicate_observations"] for m in manifests) == 1


def test_unmatched_observations_carry_their_reason(runs):
    stream_out, _, _ = runs
    unmatched = sorted(
        (u["reason"], u["event"]["decision_id"])
        for u in _lines(stream_out, "unmatched_observations")
    )
    assert unmatched == [("orphan", "d-404"), ("out_of_window", "d2")]


def test_bad_event_time_attributes_are_rejected_as_bad_time(runs):
    stream_out, _, _ = runs
    rejected = _lines(stream_out, "rejected")
    bad_time = sorted(r["source"] for r in rejected if r["reason"] == "bad_time")
    assert bad_time == ["decision", "observation"]
    assert [r["source"] for r in rejected if r["reason"] == "bad_json"] == ["decision"]


def test_backfill_older_than_the_allowed_lateness_goes_to_late_with_a_reason(runs):
    stream_out, _, _ = runs
    late = _lines(stream_out, "late")
    assert sorted((r["reason"], r["source"]) for r in late) == [
        ("late", "decision"),
        ("late", "observation"),
    ]
    assert all("allowed lateness 6000 ms" in r["detail"] for r in late)
    assert not [r for r in _lines(stream_out, "rejected") if r["reason"] == "late"]
    manifests = _manifests(stream_out)
    assert sum(m["late_decisions"] for m in manifests) == 1
    assert sum(m["late_observations"] for m in manifests) == 1
    # The backfill's payload keeps no raw private value (the blueprint pseudonymises user_id).
    assert not [r for r in late if FEATURES["user_id"] in json.dumps(r)]
