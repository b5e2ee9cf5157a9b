"""The streaming join with its workers in separate processes (issue 12.4).

Beam's Python DirectRunner cannot run a streaming Pub/Sub pipeline in several processes: with
``--streaming --direct_running_mode multi_processing --direct_num_workers 2`` it first tries the
Prism runner (a binary it downloads; offline: "Unable to fetch remote prism binary"), then falls
back to its bundle-based runner, which runs every step in threads of the launching process and
ignores both flags, without an error (docs/streaming.md, "Workers in separate processes").

What does run in separate processes is tested here: the streaming job exactly as
``pipelines.join_decisions.run`` builds it for two subscriptions (AssignEventTime, the parse
steps, the join's stateful session gate with its event-time timers, the session CoGroupByKey,
one span per output window with late/ and its manifest), on the FnApiRunner with two worker
processes. The one stand-in is the Pub/Sub client boundary: ``ReadFromPubSub`` is replaced by a
bounded read of the same messages, stamped with their publish time as ``ReadFromPubSub`` stamps
them; it records the process it runs in, so the test knows the workers were other processes.
The same job in one process (``in_memory``) must write the same examples and counts.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.transforms.window import TimestampedValue

from loopline.events import parse_event_time
from pipelines.join_decisions import run
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.join_fixtures import simulate_logs
from transforms.streaming import event_time_of

KEY = "multiprocess-test-key"
DECISIONS_SUB = "projects/loopline-test/subscriptions/decisions"
OBSERVATIONS_SUB = "projects/loopline-test/subscriptions/observations"
BACKFILL_DELAY_MS = 2 * 3_600_000  # published two hours after the event: beyond the lateness
pytestmark = pytest.mark.slow


def _messages(pattern: str) -> list[tuple[bytes, dict, int]]:
    """Each log line as (data, attributes, publish ms): published at its event time, except
    every 25th event, published two hours late (a backfill); a line without a readable event
    time carries no attribute and goes out at time 0 (it is refused as bad_time)."""
    messages = []
    for path in sorted(glob.glob(pattern)):
        for i, line in enumerate(Path(path).read_bytes().splitlines()):
            try:
                event_time = json.loads(line)["event_time"]
            except (ValueError, KeyError, TypeError):
                messages.append((line, {}, 0))
                continue
            try:
                published = parse_event_time(event_time)
            except ValueError:
                messages.append((line, {"event_time": str(event_time)}, 0))
                continue
            late = BACKFILL_DELAY_MS if i % 25 == 24 else 0
            messages.append((line, {"event_time": str(event_time)}, published + late))
    return messages


def _published(message: tuple[bytes, dict, int], pid_dir: str) -> TimestampedValue:
    Path(pid_dir, str(os.getpid())).touch()
    data, attributes, published_ms = message
    return TimestampedValue(PubsubMessage(data, attributes), published_ms / 1000)


class _BoundedPubSub(beam.PTransform):
    """Stands in for ``ReadFromPubSub``: the subscription's messages, stamped by publish time."""

    messages: dict[str, list] = {}
    pid_dir = ""

    def __init__(self, subscription: str, with_attributes: bool, **others):
        super().__init__()
        assert with_attributes
        self.subscription = subscription

    def expand(self, pbegin: beam.pvalue.PBegin):
        return (
            pbegin
            | "Messages" >> beam.Create(self.messages[self.subscription])
            | "Published" >> beam.Map(_published, self.pid_dir)
        )


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return simulate_logs(tmp_path_factory.mktemp("logs"), seed=21, decisions=300)


def _stream(logs: Path, output: Path, pid_dir: Path, *beam_args: str) -> None:
    pid_dir.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        mp.setattr(
            _BoundedPubSub,
            "messages",
            {
                DECISIONS_SUB: _messages(str(logs / "decisions-*.jsonl")),
                OBSERVATIONS_SUB: _messages(str(logs / "observations-*.jsonl")),
            },
        )
        mp.setattr(_BoundedPubSub, "pid_dir", str(pid_dir))
        mp.setattr(beam.io, "ReadFromPubSub", _BoundedPubSub)
        run(
            [
                "--decisions_subscription", DECISIONS_SUB,
                "--observations_subscription", OBSERVATIONS_SUB,
                "--blueprint", str(EXAMPLE_BLUEPRINT), "--allowed_lateness", "10m",
                "--output", str(output), "--output_window", "6h", *beam_args,
            ]
        )  # fmt: skip


@pytest.fixture(scope="module")
def separate(logs, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("multi_processing")
    _stream(
        logs, base / "out", base / "pids",
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    )  # fmt: skip
    return base / "out", base / "pids"


@pytest.fixture(scope="module")
def in_process(logs, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("in_memory")
    _stream(logs, base / "out", base / "pids", "--direct_running_mode=in_memory")
    return base / "out"


def _examples(output: Path) -> dict[str, dict]:
    files = sorted(glob.glob(str(output / "*" / "examples" / "*" / "*.tfrecord.gz")))
    examples = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        values = {n: list(getattr(f, f.WhichOneof("kind")).value) for n, f in features.items()}
        decision_id = values["decision_id"][0].decode()
        assert decision_id not in examples, f"{decision_id} written twice"
        examples[decision_id] = values
    return examples


def _totals(output: Path) -> dict[str, int]:
    manifests = [json.loads(p.read_text()) for p in sorted(output.glob("*/manifest.json"))]
    assert manifests and all(m["reconciles"] for m in manifests)
    names = [k for k, v in manifests[0].items() if isinstance(v, int) and not isinstance(v, bool)]
    return {name: sum(m[name] for m in manifests) for name in names}


def test_the_streaming_job_ran_in_worker_processes(separate):
    _, pid_dir = separate
    pids = {int(p.name) for p in pid_dir.iterdir()}
    assert pids and os.getpid() not in pids


def test_workers_in_separate_processes_write_what_one_process_writes(separate, in_process):
    output, _ = separate
    examples = _examples(output)
    assert len(examples) > 200
    assert examples == _examples(in_process)
    assert _totals(output) == _totals(in_process)


def test_every_message_is_counted_once_with_backfills_in_late(separate, logs):
    output, _ = separate
    totals = _totals(output)
    decisions = _messages(str(logs / "decisions-*.jsonl"))
    observations = _messages(str(logs / "observations-*.jsonl"))
    assert totals["decisions_in"] == len(decisions)
    assert totals["observations_in"] == len(observations)
    late = [
        json.loads(line)
        for path in glob.glob(str(output / "*/late/*.jsonl"))
        for line in Path(path).read_text().splitlines()
    ]
    backfills = [m for m in decisions + observations if m[2] and m[1] and _is_backfill(m)]
    assert totals["late_decisions"] + totals["late_observations"] == len(late) == len(backfills)
    assert {r["reason"] for r in late} == {"late"}


def _is_backfill(message: tuple[bytes, dict, int]) -> bool:
    return message[2] - event_time_of(message[1]) == BACKFILL_DELAY_MS
