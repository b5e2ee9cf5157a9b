"""The join on bad bytes and values, and on simulator data with privacy: nothing crashes, every
refusal is counted with its reason, the manifest reconciles, and no raw identifier the
blueprint pseudonymises or drops reaches any file the join writes."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from loopline.events import (
    BAD_JSON,
    BAD_TIME,
    FEATURE_TYPE,
    LABEL_TYPE,
    MAX_EVENT_TIME_MS,
    WRONG_TYPE,
)
from loopline.privacy import PayloadPrivacy
from pipelines import join_decisions
from tests.test_join import FEATURES, MINUTE, T0, decision, observation
from transforms.events import ParseDecisions, ParseObservations, WriteQuarantine
from transforms.join import JoinDecisions
from transforms.manifest import MANIFEST
from transforms.span import SpanInputs, WriteSpan

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
KEY = "bad-input-test-key"
BOM = b"\xef\xbb\xbf"


def decision_line(decision_id: str, **changes) -> bytes:
    obj = decision(decision_id, at=T0).to_dict()
    obj.update(changes)
    return json.dumps(obj).encode()


def with_feature(decision_id: str, name: str, value) -> bytes:
    return decision_line(decision_id, features={**FEATURES, name: value})


def observation_line(decision_id: str, **changes) -> bytes:
    obj = observation(decision_id, at=T0 + MINUTE, click=1).to_dict()
    obj.update(changes)
    return json.dumps(obj).encode()


# Each bad line and the reason it must be refused with; ids are unique so nothing is a duplicate.
BAD_DECISIONS = [
    (decision_line("d-utf8").replace(b"d-utf8", b"d-\xff\xfe"), BAD_JSON),
    (b"\x80\x81 not even json", BAD_JSON),
    (with_feature("d-int64", "tenure_days", 2**70), FEATURE_TYPE),
    (with_feature("d-int64-neg", "tenure_days", -(2**63) - 1), FEATURE_TYPE),
    (with_feature("d-f32", "open_rate_30d", 1e308), FEATURE_TYPE),
    (with_feature("d-nan", "open_rate_30d", float("nan")), FEATURE_TYPE),
    (with_feature("d-inf-list", "recent_clicks", [1.0, float("inf")]), FEATURE_TYPE),
    (with_feature("d-surrogate", "country", "K\udcff"), FEATURE_TYPE),
    (decision_line("d-prop", propensity=2**70), WRONG_TYPE),
    (decision_line("d-seconds", event_time=T0 // 1000), BAD_TIME),
    (decision_line("d-micros", event_time=T0 * 1000), BAD_TIME),
    (decision_line("d-1999", event_time="1999-12-31T23:59:59Z"), BAD_TIME),
    (decision_line("d-2100", event_time=MAX_EVENT_TIME_MS), BAD_TIME),
]
BAD_OBSERVATIONS = [
    (observation_line("d-good-1").replace(b"click", b"cl\xffck"), BAD_JSON),
    (observation_line("d-good-1", observations={"click": 2**70}), LABEL_TYPE),
    (observation_line("d-good-1", observations={"click": 1e23}), LABEL_TYPE),
    (observation_line("d-good-2", event_time=(T0 + MINUTE) // 1000), BAD_TIME),
    (
        observation_line("d-good-2").replace(
            b'{"click"', b'{"x": ' + b"[" * 600 + b"]" * 600 + b', "click"'
        ),
        BAD_JSON,
    ),
]
GOOD_DECISIONS = ["d-good-1", "d-good-2", "d-bom"]


@pytest.fixture(scope="module")
def bad_input_span(tmp_path_factory) -> tuple[Path, dict]:
    """One join run (``pipelines.join_decisions.run``, as launched) over files that mix good
    events, a byte-order mark at the start of a file and every kind of bad line above."""
    logs = tmp_path_factory.mktemp("bad-logs")
    good = [decision_line(i) for i in GOOD_DECISIONS if i != "d-bom"]
    bad = [line for line, _ in BAD_DECISIONS]
    (logs / "decisions-1.jsonl").write_bytes(b"\n".join(good + bad[:6]) + b"\n")
    (logs / "decisions-2.jsonl").write_bytes(BOM + b"\r\n".join([decision_line("d-bom"), *bad[6:]]))
    observations = [observation_line("d-good-1"), observation_line("d-bom")]
    (logs / "observations-1.jsonl").write_bytes(
        BOM + b"\n".join(observations + [line for line, _ in BAD_OBSERVATIONS]) + b"\n"
    )
    output = tmp_path_factory.mktemp("bad-span") / "span"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        manifest = join_decisions.run(
            [
                "--decisions", str(logs / "decisions-*.jsonl"),
                "--observations", str(logs / "observations-*.jsonl"),
                "--blueprint", str(BLUEPRINT),
                "--output", str(output),
            ]
        )  # fmt: skip
    return output, manifest


def test_bad_bytes_and_values_are_refused_not_fatal_and_the_manifest_reconciles(bad_input_span):
    _, manifest = bad_input_span
    assert manifest["reconciles"] is True
    assert manifest["decisions_in"] == len(GOOD_DECISIONS) + len(BAD_DECISIONS)
    assert manifest["observations_in"] == 2 + len(BAD_OBSERVATIONS)


def test_each_bad_line_is_counted_under_its_reason(bad_input_span):
    _, manifest = bad_input_span
    assert manifest["rejected_by_reason"]["decision"] == dict(
        Counter(reason for _, reason in BAD_DECISIONS)
    )
    assert manifest["rejected_by_reason"]["observation"] == dict(
        Counter(reason for _, reason in BAD_OBSERVATIONS)
    )


def test_a_byte_order_mark_at_the_start_of_a_file_costs_no_event(bad_input_span):
    _, manifest = bad_input_span
    assert manifest["examples_written"] == len(GOOD_DECISIONS)
    # d-good-1 (its observation right after the observations file's BOM) and d-bom (its
    # decision right after the second decisions file's BOM).
    assert manifest["examples_observed"] == 2


def test_every_refusal_is_written_to_rejected_with_its_reason(bad_input_span):
    output, _ = bad_input_span
    rejected = [
        json.loads(line) for f in (output / "rejected").glob("*.jsonl") for line in f.open()
    ]
    assert Counter((r["source"], r["reason"]) for r in rejected) == Counter(
        [("decision", reason) for _, reason in BAD_DECISIONS]
        + [("observation", reason) for _, reason in BAD_OBSERVATIONS]
    )


# --- Simulator data with the parse steps' privacy: no raw identifier in any output ---------


@pytest.fixture(scope="module")
def simulated_logs(tmp_path_factory) -> Path:
    """``python -m loopline.simulate`` output with many malformed lines, plus lines that hold
    identifiers in bytes that are not UTF-8 or after a byte-order mark."""
    logs = tmp_path_factory.mktemp("sim-logs")
    subprocess.run(
        [
            sys.executable, "-m", "loopline.simulate",
            "--blueprint", str(BLUEPRINT), "--output", str(logs),
            "--decisions", "250", "--days", "1", "--start", "2026-11-01",
            "--malformed_rate", "0.2", "--seed", "11",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    first = sorted(logs.glob("decisions-*.jsonl"))[0]
    line = first.read_bytes().splitlines()[0]
    extra = [
        line.replace(b'"decision_id":"', b'"decision_id":"\xff'),  # not UTF-8, holds PII
        BOM + line[: len(line) * 3 // 4],  # cut off after a BOM
        line.replace(b'"tenure_days":', b'"email":"x@example.com","tenure_days":2e400,"x":'),
    ]
    (logs / "decisions-extra.jsonl").write_bytes(b"\n".join(extra) + b"\n")
    return logs


def build_private_join(pipeline, config, quarantine_dir: Path):
    """``pipelines.join_decisions.build`` with the parse steps' privacy and a quarantine:
    the wiring the join needs (see the report), made here from its transforms."""
    bp = config.blueprint
    privacy = PayloadPrivacy.from_blueprint(bp, config.key, quarantine=True)
    raw_decisions = pipeline | "ReadDecisions" >> config.decisions
    raw_observations = pipeline | "ReadObservations" >> config.observations
    decisions = raw_decisions | "ParseDecisions" >> ParseDecisions(
        bp, format=config.decisions.parse_format, privacy=privacy
    )
    observations = raw_observations | "ParseObservations" >> ParseObservations(
        bp, format=config.observations.parse_format, privacy=privacy
    )
    _ = (decisions.quarantined, observations.quarantined) | "WriteQuarantine" >> WriteQuarantine(
        str(quarantine_dir)
    )
    join = (decisions.events, observations.events) | "JoinDecisions" >> JoinDecisions(bp)
    inputs = SpanInputs.from_join(
        join, decisions.rejected, observations.rejected, raw_decisions, raw_observations
    )
    return inputs | "WriteSpan" >> WriteSpan(config.output, bp, config.key)


@pytest.fixture(scope="module")
def private_span(simulated_logs, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("private")
    output, quarantine = root / "span", root / "quarantine"
    options = PipelineOptions(
        [
            "--decisions", str(simulated_logs / "decisions-*.jsonl"),
            "--observations", str(simulated_logs / "observations-*.jsonl"),
            "--blueprint", str(BLUEPRINT), "--output", str(output),
        ]
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        config = join_decisions.resolve(
            options.view_as(join_decisions.JoinDecisionsOptions), streaming=False
        )
        with beam.Pipeline(options=options) as pipeline:
            build_private_join(pipeline, config, quarantine)
    return output, quarantine


IDENTIFIER = re.compile(rb"u\d{7}|[\w.+-]+@example\.com")


def identifiers_in(root: Path) -> dict[str, set[bytes]]:
    """Every user_id / email-shaped token in each file under ``root``, gzip files unpacked."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        found[str(path.relative_to(root))] = set(IDENTIFIER.findall(data))
    return found


def test_the_private_join_accounts_for_every_line(private_span, simulated_logs):
    output, _ = private_span
    manifest = json.loads((output / MANIFEST).read_text())
    lines = sum(len(f.read_bytes().splitlines()) for f in simulated_logs.glob("decisions-*.jsonl"))
    assert manifest["reconciles"] is True and manifest["decisions_in"] == lines
    assert manifest["rejected_decisions"] >= 3 + 10  # the extra lines and malformed ones


def test_no_output_file_of_the_join_holds_a_raw_identifier(private_span, simulated_logs):
    output, _ = private_span
    raw = set().union(*identifiers_in(simulated_logs).values())
    assert sum(b"@" in i for i in raw) > 50 and sum(b"@" not in i for i in raw) > 50
    leaks = {path: ids & raw for path, ids in identifiers_in(output).items() if ids & raw}
    assert leaks == {}
    assert any("rejected" in path for path in identifiers_in(output))


def test_raw_refused_payloads_are_kept_only_in_the_quarantine(private_span):
    output, quarantine = private_span
    quarantined = [json.loads(line) for f in quarantine.glob("*.jsonl") for line in f.open()]
    rejected = [
        json.loads(line) for f in (output / "rejected").glob("*.jsonl") for line in f.open()
    ]
    assert len(quarantined) == len(rejected) > 0
    assert any(IDENTIFIER.search(q.get("payload", "").encode()) for q in quarantined)
    digests = {
        r["payload"]["sha256"] for r in rejected if set(r["payload"]) == {"sha256", "length"}
    }
    assert digests and digests <= {q["sha256"] for q in quarantined}
