"""``pipelines.train`` on the spans a streaming join wrote (issue 12.4): one span per output
window under ``ROOT/<name>/<window start>``, consumed exactly like daily batch spans.

A simulated day of events goes through ``python -m pipelines.join_decisions --streaming`` on the
DirectRunner, the Pub/Sub client boundary replaced by a TestStream as in
tests/test_join_streaming_pipeline.py (each message published at its event time, one batch per
hour, the watermark following the event times hour by hour); then a real TFX run (LocalDagRunner, SQLite metadata)
trains on every window span it finds under the dataset root.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
from pathlib import Path

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.blueprint import load_blueprint
from loopline.events import format_event_time, parse_event_time
from loopline.simulate import FaultRates, Simulator
from pipelines import train
from pipelines.join_decisions import run
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.test_join_streaming_pipeline import (
    DEC,
    DECISIONS_SUB,
    OBS,
    OBSERVATIONS_SUB,
    _FakePubSub,
)

KEY = "streaming-train-key"
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
HOUR = 3_600_000
pytestmark = pytest.mark.slow


def _events(logs: Path) -> list[tuple[str, bytes, int]]:
    """Every simulated event as (tag, data, event time), in event-time order."""
    events = []
    for tag in (DEC, OBS):
        for path in sorted(logs.glob(f"{tag}-*.jsonl")):
            for line in path.read_bytes().splitlines():
                events.append((tag, line, parse_event_time(json.loads(line)["event_time"])))
    return sorted(events, key=lambda e: e[2])


def _hourly_stream(events: list[tuple[str, bytes, int]]) -> test_stream.TestStream:
    """The events as Pub/Sub messages published at their event time, one batch per hour and
    subscription, the watermark moved to each hour's end once its events are in."""
    stream = test_stream.TestStream(output_tags=[DEC, OBS])
    batches: dict[str, list] = {DEC: [], OBS: []}

    def flush() -> None:
        for tag, batch in batches.items():
            if batch:
                stream.add_elements(batch, tag=tag)
            batches[tag] = []

    hour_end = START_MS + HOUR
    for tag, data, at in events:
        while at >= hour_end:
            flush()
            for each in (DEC, OBS):
                stream.advance_watermark_to(Timestamp(micros=hour_end * 1000), tag=each)
            hour_end += HOUR
        message = PubsubMessage(data, {"event_time": format_event_time(at)})
        batches[tag].append(TimestampedValue(message, at / 1000))
    flush()
    for tag in (DEC, OBS):
        stream.advance_watermark_to_infinity(tag=tag)
    return stream


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> Path:
    """The dataset root the streaming join wrote its window spans under (ROOT/notify/...)."""
    base = tmp_path_factory.mktemp("streaming_train")
    Simulator(load_blueprint(EXAMPLE_BLUEPRINT), seed=5, faults=FaultRates(0.0, 0.0, 0.0)).run(
        base / "logs", decisions=1500, days=1, start_ms=START_MS
    )
    root = base / "data"
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        mp.setattr(_FakePubSub, "calls", [])
        mp.setattr(_FakePubSub, "streams", {})
        mp.setattr(_FakePubSub, "script", _events(base / "logs"))
        mp.setattr(_FakePubSub, "make_stream", staticmethod(_hourly_stream))
        mp.setattr(beam.io, "ReadFromPubSub", _FakePubSub)
        run(
            [
                "--streaming",
                "--decisions_subscription", DECISIONS_SUB,
                "--observations_subscription", OBSERVATIONS_SUB,
                "--blueprint", str(EXAMPLE_BLUEPRINT), "--allowed_lateness", "10m",
                "--output", str(root / "notify"), "--output_window", "12h", "--num_shards", "1",
            ]
        )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def trained(streamed, tmp_path_factory) -> tuple[int, str, dict]:
    base = tmp_path_factory.mktemp("trained")
    windows = sorted(p.parent.name for p in (streamed / "notify").glob("*/manifest.json"))
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        rc = train.main(
            [
                "--blueprint", str(EXAMPLE_BLUEPRINT), "--dataset_root", str(streamed),
                "--spans", str(len(windows)), "--pipeline_root", str(base / "pipeline_root"),
                "--serving_dir", str(base / "serving"),
                "--direct_num_workers=1", "--direct_running_mode=in_memory",
            ]
        )  # fmt: skip
    records = sorted((base / "pipeline_root" / "records").glob("*.json"))
    record = json.loads(records[-1].read_text()) if records else {}
    return rc, err.getvalue(), record


def _manifests(root: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((root / "notify").glob("*/manifest.json"))
    }


def _count(files: list[str]) -> int:
    return sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def test_streaming_job_writes_complete_window_spans_with_both_splits(streamed):
    manifests = _manifests(streamed)
    assert len(manifests) >= 2 and list(manifests)[0] == "2026-11-01T000000.000Z"
    for name, manifest in manifests.items():
        assert manifest["reconciles"] is True, name
        for split in ("train", "eval"):
            files = glob.glob(
                str(streamed / "notify" / name / "examples" / split / "*.tfrecord.gz")
            )
            assert len(files) == 1 and _count(files) == manifest[f"examples_{split}"] > 0, name


def test_train_consumes_every_window_span_like_a_daily_span(streamed, trained):
    rc, err, record = trained
    assert rc == 0, err[-3000:]
    manifests = _manifests(streamed)
    assert [s["date"] for s in record["spans"]] == list(manifests)
    assert [s["counts"]["examples_written"] for s in record["spans"]] == [
        m["examples_written"] for m in manifests.values()
    ]
    # The evaluator saw exactly the eval examples of all the window spans.
    assert record["metrics"]["overall"]["example_count"] == sum(
        m["examples_eval"] for m in manifests.values()
    )
