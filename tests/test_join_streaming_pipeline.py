"""``python -m pipelines.join_decisions --streaming`` end to end on the DirectRunner.

The real pipeline construction (``pipelines.join_decisions.run``: ReadEvents -> ParseDecisions /
ParseObservations(format="pubsub") -> JoinDecisions (session windows) -> WriteSpan per output
window) runs in streaming mode. The ONLY fake is the Pub/Sub client boundary: the
``beam.io.ReadFromPubSub`` that ``transforms.sources.ReadEvents`` builds is replaced by a
``TestStream`` of ``PubsubMessage(data=<JSON bytes>, attributes={"event_time": ...})`` whose
elements carry the ``event_time`` attribute as their timestamp (what ``timestamp_attribute``
does), with watermark steps and data arriving behind the watermark.

The same events, written as JSON lines, go through the batch pipeline; the streaming run must
write the same examples (read back with TensorFlow), spread over hourly output windows, each
with a manifest that reconciles, and its malformed messages under ``rejected/``.
"""

from __future__ import annotations

import glob
import json
from datetime import datetime
from pathlib import Path

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.blueprint import load_blueprint
from loopline.events import format_event_time
from loopline.privacy import PayloadPrivacy
from pipelines.join_decisions import run
from transforms.join import session_gap_ms
from transforms.manifest import COUNT_NAMES

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
KEY = "streaming-test-key"
MINUTE = 60_000
HOUR = 60 * MINUTE
T0 = 1_793_534_400_000  # 2026-11-01T12:00:00Z
LATENESS = "10m"
DECISIONS_SUB = "projects/loopline-test/subscriptions/decisions"
OBSERVATIONS_SUB = "projects/loopline-test/subscriptions/observations"


def _decision(decision_id: str, at: int, user: str = "u-1") -> dict:
    return {
        "decision_id": decision_id,
        "decision_type": "notify",
        "event_time": format_event_time(at),
        "features": {
            "user_id": user,
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
        },
        "decision": 1,
        "model_id": "notify-1",
        "propensity": 0.9,
    }


def _observation(decision_id: str, at: int, click: int) -> dict:
    return {
        "decision_id": decision_id,
        "event_time": format_event_time(at),
        "observations": {"click": click},
    }


def _message(tag: str, event: dict | bytes, at: int) -> tuple[str, bytes, int]:
    data = event if isinstance(event, bytes) else json.dumps(event).encode()
    return tag, data, at


def _watermark(ms: int) -> tuple[str, int]:
    return "watermark", ms


DEC, OBS = "decisions", "observations"
SUBSCRIPTIONS = {DECISIONS_SUB: DEC, OBSERVATIONS_SUB: OBS}
# What both subscriptions deliver, in arrival order: messages (tag, data, event time) and
# watermark steps. A decision's session gap is window + slack + allowed lateness (1h 12m).
SCRIPT = [
    _watermark(T0 - MINUTE),
    _message(OBS, _observation("d2", T0 + 19 * MINUTE, 1), T0 + 19 * MINUTE),  # before d2: slack
    _message(DEC, _decision("d1", T0), T0),
    _message(DEC, _decision("d2", T0 + 20 * MINUTE, user="u-2"), T0 + 20 * MINUTE),
    _message(OBS, _observation("d-404", T0 + 30 * MINUTE, 1), T0 + 30 * MINUTE),  # orphan
    _message(DEC, _decision("d3", T0 + 41 * MINUTE), T0 + 41 * MINUTE),
    _message(DEC, _decision("d3", T0 + 40 * MINUTE), T0 + 40 * MINUTE),  # the earlier one wins
    _message(OBS, _observation("d1", T0 + 10 * MINUTE, 1), T0 + 10 * MINUTE),  # out of order
    _message(DEC, b"{not json", T0 + 45 * MINUTE),  # malformed
    _message(
        DEC, {**_decision("d9", T0 + 46 * MINUTE), "decision_type": "other"}, T0 + 46 * MINUTE
    ),
    _message(OBS, {"decision_id": "d1"}, T0 + 50 * MINUTE),  # malformed: no observations
    _message(DEC, _decision("d5", T0 + HOUR), T0 + HOUR),
    _message(OBS, _observation("d1", T0 + 70 * MINUTE, 1), T0 + 70 * MINUTE),  # past d1's window
    _watermark(T0 + 2 * HOUR + 5 * MINUTE),
    # Late: behind the watermark and past the 13:00-14:00 output window, but d5's session
    # (to 14:12) is still open, and the broken message is within the allowed lateness.
    _message(OBS, _observation("d5", T0 + 110 * MINUTE, 1), T0 + 110 * MINUTE),
    _message(OBS, b'{"decision_id": "d5", "event_time": ', T0 + 118 * MINUTE),
    _message(DEC, _decision("d4", T0 + 130 * MINUTE), T0 + 130 * MINUTE),
    _message(OBS, _observation("d4", T0 + 160 * MINUTE, 0), T0 + 160 * MINUTE),
    _message(OBS, _observation("d4", T0 + 160 * MINUTE, 0), T0 + 160 * MINUTE),  # exact repeat
    _watermark(T0 + 3 * HOUR),
]


def _published(tag: str) -> list[bytes]:
    return [step[1] for step in SCRIPT if step[0] == tag]


def _pubsub_test_stream(script: list) -> test_stream.TestStream:
    """The script as Pub/Sub messages, each published at its event time (so none is late at
    the source, however far behind the watermark it arrives), with its ``event_time``."""
    stream = test_stream.TestStream(output_tags=[DEC, OBS])
    for step in script:
        if step[0] == "watermark":
            for tag in (DEC, OBS):
                stream.advance_watermark_to(Timestamp(micros=step[1] * 1000), tag=tag)
            continue
        tag, data, at = step
        # ReadFromPubSub without timestamp_attribute stamps a message with its publish time.
        message = PubsubMessage(data, {"event_time": format_event_time(at)})
        stream.add_elements([TimestampedValue(message, at / 1000)], tag=tag)
    for tag in (DEC, OBS):
        stream.advance_watermark_to_infinity(tag=tag)
    return stream


class _FakePubSub(beam.PTransform):
    """Stands in for ``beam.io.ReadFromPubSub`` at the client boundary.

    The Python DirectRunner runs only one TestStream per pipeline (its evaluator keeps the event
    stream in a class attribute), so both subscriptions share one tagged TestStream, applied by
    the first read; each read returns its subscription's tag.
    """

    calls: list[dict] = []
    streams: dict = {}
    script: list = SCRIPT
    make_stream = staticmethod(_pubsub_test_stream)  # script -> TestStream

    def __init__(self, subscription: str, with_attributes: bool, **others):
        super().__init__()
        self.subscription = subscription
        self.calls.append(
            {"subscription": subscription, "with_attributes": with_attributes, **others}
        )

    def expand(self, pbegin: beam.pvalue.PBegin):
        key = id(pbegin.pipeline)
        if key not in self.streams:
            self.streams[key] = pbegin | "PubSubTestStream" >> self.make_stream(self.script)
        return self.streams[key][SUBSCRIPTIONS[self.subscription]] | "Messages" >> beam.Map(
            lambda message: message
        )


def _examples(files: list[str]) -> list[bytes]:
    """Serialized (deterministic) tf.Examples read back with TensorFlow."""
    dataset = tf.data.TFRecordDataset(sorted(files), compression_type="GZIP")
    return [
        tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True)
        for r in dataset
    ]


def _decision_id(serialized: bytes) -> str:
    example = tf.train.Example.FromString(serialized)
    return example.features.feature["decision_id"].bytes_list.value[0].decode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(batch span, batch manifest, streaming output) for the same events."""
    root = tmp_path_factory.mktemp("streaming")
    logs = root / "logs"
    logs.mkdir()
    for tag in (DEC, OBS):
        with open(logs / f"{tag}-0.jsonl", "wb") as f:
            f.writelines(data + b"\n" for data in _published(tag))
    common = ["--blueprint", str(BLUEPRINT), "--allowed_lateness", LATENESS]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        batch = run(
            [
                "--decisions", str(logs / "decisions-*.jsonl"),
                "--observations", str(logs / "observations-*.jsonl"),
                "--output", str(root / "batch"), *common,
            ]
        )  # fmt: skip
        mp.setattr(_FakePubSub, "calls", [])
        mp.setattr(_FakePubSub, "streams", {})
        mp.setattr(beam.io, "ReadFromPubSub", _FakePubSub)
        streamed = run(
            [
                "--streaming",
                "--decisions_subscription", DECISIONS_SUB,
                "--observations_subscription", OBSERVATIONS_SUB,
                "--output", str(root / "stream"), "--output_window", "1h", *common,
            ]
        )  # fmt: skip
        assert streamed is None
        assert _FakePubSub.calls == [
            {"subscription": sub, "with_attributes": True}
            for sub in (DECISIONS_SUB, OBSERVATIONS_SUB)
        ]
    return root / "batch", batch, root / "stream"


def _window_manifests(stream: Path) -> list[dict]:
    paths = sorted(stream.glob("*/manifest.json"))  # one span per output window
    return [json.loads(p.read_text()) for p in paths]


def test_streaming_writes_the_same_examples_as_batch_per_output_window(runs):
    batch_dir, batch, stream = runs
    batch_examples = _examples(glob.glob(str(batch_dir / "examples/*/*.tfrecord.gz")))
    assert batch["reconciles"] and len(batch_examples) == batch["examples_written"] == 5
    manifests = _window_manifests(stream)
    assert manifests
    streamed: list[bytes] = []
    gap = session_gap_ms(load_blueprint(BLUEPRINT), 10 * MINUTE)
    last_event = {"d1": T0 + 70 * MINUTE, "d2": T0 + 20 * MINUTE, "d3": T0 + 41 * MINUTE,
                  "d4": T0 + 160 * MINUTE, "d5": T0 + 110 * MINUTE}  # fmt: skip
    for manifest in manifests:
        window = manifest["output_window"]
        files = manifest["files"]["train"] + manifest["files"]["eval"]
        examples = _examples(files)
        assert len(examples) == manifest["examples_written"]
        # A decision is written in the output window where its grouping session (twice the
        # gap: transforms/join.py) closes.
        start, end = (_ms(window["start"]), _ms(window["end"]))
        ids = sorted(_decision_id(e) for e in examples)
        assert ids == sorted(d for d, t in last_event.items() if start <= t + 2 * gap - 1 < end)
        streamed += examples
    assert sorted(streamed) == sorted(batch_examples)


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def test_every_window_manifest_reconciles_and_totals_match_batch(runs):
    _, batch, stream = runs
    manifests = _window_manifests(stream)
    for manifest in manifests:
        assert manifest["reconciles"] is True, manifest["reconciliation"]
        listed = [f for files in manifest["files"].values() for f in files]
        assert all(Path(f).exists() for f in listed)
    totals = {name: sum(m[name] for m in manifests) for name in COUNT_NAMES}
    assert totals["decisions_in"] == len(_published(DEC))
    assert totals["observations_in"] == len(_published(OBS))
    assert totals == {name: batch[name] for name in COUNT_NAMES}


def test_malformed_messages_land_in_rejected(runs):
    _, _, stream = runs
    rejected = [
        json.loads(line)
        for path in sorted(glob.glob(str(stream / "*/rejected/*.jsonl")))
        for line in Path(path).read_text().splitlines()
    ]
    # Payloads are redacted where they are refused: JSON keeps its shape with the blueprint's
    # privacy applied, anything else is kept as its digest.
    bp = load_blueprint(BLUEPRINT)
    redact = PayloadPrivacy.from_blueprint(bp, KEY.encode()).redact
    got = sorted(
        (r["source"], r["reason"], json.dumps(r["payload"], sort_keys=True)) for r in rejected
    )
    assert got == sorted(
        (source, reason, json.dumps(redact(raw), sort_keys=True))
        for source, reason, raw in [
            ("decision", "bad_json", "{not json"),
            ("decision", "wrong_decision_type", json.dumps(
                {**_decision("d9", T0 + 46 * MINUTE), "decision_type": "other"})),
            ("observation", "missing_field", json.dumps({"decision_id": "d1"})),
            ("observation", "bad_json", '{"decision_id": "d5", "event_time": '),
        ]
    )  # fmt: skip


# d1's session ends at 13:22 (its last observation, 12:10, plus the 1h 12m gap): its example
# is written and the join remembers d1 for one more gap, to 14:34. The observation of 12:50,
# inside d1's label window, arrives with the watermark at 15:10, beyond that horizon: it opens
# a session of its own (to 12:50 + 2 gaps = 15:14, still ahead of the watermark) and is
# reported orphan, counted in the manifest of the output window where that session ends.
LATE_SCRIPT = [
    _watermark(T0 - MINUTE),
    _message(DEC, _decision("d1", T0), T0),
    _message(OBS, _observation("d1", T0 + 10 * MINUTE, 1), T0 + 10 * MINUTE),
    _watermark(T0 + 3 * HOUR + 10 * MINUTE),
    _message(OBS, _observation("d1", T0 + 50 * MINUTE, 0), T0 + 50 * MINUTE),
    _message(DEC, _decision("d2", T0 + 3 * HOUR + 20 * MINUTE), T0 + 3 * HOUR + 20 * MINUTE),
]


def test_an_observation_beyond_the_horizon_lands_as_orphan_and_is_counted(tmp_path):
    # No --streaming: two subscriptions make it a streaming job (as a Flex Template launches it).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        mp.setattr(_FakePubSub, "calls", [])
        mp.setattr(_FakePubSub, "streams", {})
        mp.setattr(_FakePubSub, "script", LATE_SCRIPT)
        mp.setattr(beam.io, "ReadFromPubSub", _FakePubSub)
        run(
            [
                "--blueprint", str(BLUEPRINT), "--allowed_lateness", LATENESS,
                "--decisions_subscription", DECISIONS_SUB,
                "--observations_subscription", OBSERVATIONS_SUB,
                "--output", str(tmp_path), "--output_window", "1h",
            ]
        )  # fmt: skip
    unmatched = [
        json.loads(line)
        for path in sorted(glob.glob(str(tmp_path / "*/unmatched_observations/*.jsonl")))
        for line in Path(path).read_text().splitlines()
    ]
    assert unmatched == [{"reason": "orphan", "event": _observation("d1", T0 + 50 * MINUTE, 0)}]
    manifests = _window_manifests(tmp_path)
    assert all(m["reconciles"] is True for m in manifests), [m["reconciliation"] for m in manifests]
    totals = {name: sum(m[name] for m in manifests) for name in COUNT_NAMES}
    published = [step for step in LATE_SCRIPT if step[0] != "watermark"]
    assert totals["decisions_in"] == sum(1 for step in published if step[0] == DEC) == 2
    assert totals["observations_in"] == sum(1 for step in published if step[0] == OBS) == 2
    assert (totals["observations_used"], totals["observations_orphan"]) == (1, 1)
    assert totals["observations_out_of_window"] == totals["duplicate_observations"] == 0
    # The orphan is counted by the manifest of an output window that lists its file.
    (counting,) = [m for m in manifests if m["observations_orphan"]]
    assert counting["files"]["unmatched_observations"]
    assert _ms(counting["output_window"]["start"]) >= T0 + 3 * HOUR


def test_a_malformed_subscription_stops_the_launch_with_one_line(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        with pytest.raises(SystemExit) as info:
            run(
                [
                    "--blueprint", str(BLUEPRINT), "--output", str(tmp_path / "out"),
                    "--decisions_subscription", "projects/p/subscriptions/d",
                    "--observations_subscription", OBSERVATIONS_SUB,
                ]
            )  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "join_decisions: error: --decisions_subscription: Invalid PubSub project name: 'p'."
    ]
