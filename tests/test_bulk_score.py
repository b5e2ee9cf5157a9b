"""python -m pipelines.bulk_score end to end on the DirectRunner with real files and a real
SavedModel: JSON lines, Avro and TFRecord inputs, dead letters, logged decisions, workers in
separate processes, the failed-rows threshold, bad arguments."""

import json

import pytest
import tensorflow as tf

from loopline import avro
from loopline.blueprint import load_blueprint
from loopline.events import DeadLetter, parse_decision_json
from loopline.examples import features_to_example
from loopline.privacy import PayloadPrivacy
from pipelines import bulk_score
from pipelines.launch import FailedRun
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.scoring_fixtures import (
    bulk_score_in_processes,
    expected_scores,
    export_scoring_model,
    make_decisions,
    write_decision_lines,
)
from tests.scoring_fixtures import read_json_lines as _lines
from transforms.scoring_failures import BAD_EXAMPLE
from transforms.scoring_input import key_example

KEY = "test-key-not-a-secret"
CORRUPT = ['{"decision_id": "broken"', '{"decision_id": "x1", "decision_type": "notify"}']


@pytest.fixture(scope="module")
def serving_dir(tmp_path_factory, blueprint):
    root = tmp_path_factory.mktemp("serving")
    export_scoring_model(blueprint, root / "1793534400", seed=1)
    export_scoring_model(blueprint, root / "1793538000", seed=2)
    return root


def _expected_scores(events, blueprint, version_dir) -> dict[str, float]:
    return expected_scores(events, blueprint, KEY.encode(), version_dir)


def _json_run_args(source, serving_dir, blueprint_path, out) -> list[str]:
    """150 decisions and 2 corrupt lines (1.3% failed, under the threshold given here)."""
    return [
        "--input", str(source), "--model_dir", str(serving_dir),
        "--blueprint", str(blueprint_path), "--output", str(out), "--log_decisions",
        "--min_batch_size", "8", "--max_batch_size", "32", "--max_failed_fraction", "0.05",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, serving_dir, blueprint, blueprint_path):
    """bulk_score on JSON lines with 2 corrupt lines and --log_decisions, run once in process."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        work = tmp_path_factory.mktemp("json_run")
        events = make_decisions(blueprint, 150, seed=1)
        source = write_decision_lines(work / "decisions.jsonl", events, CORRUPT)
        out = work / "out"
        bulk_score.run(_json_run_args(source, serving_dir, blueprint_path, out))
    return events, source, out


@pytest.mark.slow
def test_every_decision_is_scored_exactly_by_the_latest_version(json_run, serving_dir, blueprint):
    events, _, out = json_run
    rows = _lines(out / "scores")
    expected = _expected_scores(events, blueprint, serving_dir / "1793538000")
    assert sorted(r["decision_id"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["score"] == pytest.approx(expected[row["decision_id"]], rel=1e-6, abs=1e-7)
        assert row["model_id"] == "notify-1793538000"
        assert row["scored_at"].endswith("Z")
        assert row["arm"] is None  # the default rollout mode without a challenger: no arms


@pytest.mark.slow
def test_score_rows_carry_the_blueprint_policys_choice(json_run):
    # examples/notify.yaml: epsilon-greedy at epsilon 0.05.
    for row in _lines(json_run[2] / "scores"):
        assert row["propensity"] in (pytest.approx(0.975), pytest.approx(0.025))
        assert row["decision"] in (0, 1)


@pytest.mark.slow
def test_corrupt_lines_are_dead_letters_with_their_reason_and_payload(json_run):
    failed = _lines(json_run[2] / "failed")
    assert sorted(f["reason"] for f in failed) == ["bad_json", "missing_field"]
    # The join's dead-letter record (rejected/), refused by the same parse step.
    assert {(f["source"], f["step"], f["decision_id"]) for f in failed} == {
        ("decision", "ParseDecisions", None)
    }
    assert all(f.keys() == DeadLetter.__dataclass_fields__.keys() for f in failed)
    # Payloads are kept with the blueprint's privacy applied (a line that is not JSON as its
    # digest): tests/test_bulk_score.py::test_failed_rows_keep_no_raw_identifier.
    redact = PayloadPrivacy.from_blueprint(load_blueprint(EXAMPLE_BLUEPRINT), KEY.encode()).redact
    got = sorted(json.dumps(f["payload"], sort_keys=True) for f in failed)
    assert got == sorted(json.dumps(redact(line), sort_keys=True) for line in CORRUPT)


@pytest.mark.slow
def test_logged_decisions_are_the_scored_events_with_their_choice(json_run, blueprint):
    events, _, out = json_run
    rows = {r["decision_id"]: r for r in _lines(out / "scores")}
    logged = [parse_decision_json(json.dumps(d), blueprint) for d in _lines(out / "decisions")]
    originals = {e.decision_id: e for e in events}
    assert sorted(e.decision_id for e in logged) == sorted(originals)
    for event in logged:
        row = rows[event.decision_id]
        assert event == originals[event.decision_id].with_choice(
            row["decision"], row["propensity"], row["model_id"], score=row["score"]
        )


@pytest.mark.slow
def test_the_manifest_accounts_for_every_line_and_the_model(json_run):
    manifest = json.loads((json_run[2] / "manifest.json").read_text())
    counters = manifest["counters"]
    assert counters["read.lines"] == 152
    assert counters["score.decisions"] == 150
    assert counters["parse.decisions_rejected"] == 2
    assert manifest["model_id"] == "notify-1793538000"
    assert manifest["arms"] == {"production": "notify-1793538000", "challenger": None}


@pytest.mark.slow
def test_model_batches_stay_within_the_batch_size_bounds(json_run):
    manifest = json.loads((json_run[2] / "manifest.json").read_text())
    sizes = manifest["distributions"]["inference.inference_request_batch_size"]
    assert sizes["sum"] == 150 and sizes["max"] <= 32


@pytest.mark.slow
def test_workers_in_separate_processes_score_as_the_in_process_run(
    json_run, serving_dir, blueprint_path, tmp_path
):
    # As Dataflow and the Flex Template launcher run it: the module is __main__, and the DoFns
    # run in other processes.
    _, source, in_process = json_run
    out = tmp_path / "out"
    done = bulk_score_in_processes(_json_run_args(source, serving_dir, blueprint_path, out), KEY)
    assert done.returncode == 0, done.stderr[-3000:]

    def outcome(directory):
        return {
            r["decision_id"]: (round(r["score"], 6), r["decision"], r["propensity"], r["model_id"])
            for r in _lines(directory / "scores")
        }

    assert outcome(out) == outcome(in_process)
    assert sorted(f["reason"] for f in _lines(out / "failed")) == ["bad_json", "missing_field"]


@pytest.mark.slow
def test_more_failed_rows_than_allowed_exits_non_zero_with_one_line(
    tmp_path, serving_dir, blueprint, blueprint_path, pii_key, capsys
):
    events = make_decisions(blueprint, 8, seed=3)
    source = write_decision_lines(tmp_path / "decisions.jsonl", events, CORRUPT)
    out = tmp_path / "out"
    status = bulk_score.main([
            "--input", str(source), "--model_dir", str(serving_dir),
            "--blueprint", str(blueprint_path), "--output", str(out),
            "--max_failed_fraction", "0.1",
        ])  # fmt: skip
    assert status == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bulk_score: error: 2 of 10 rows failed")
    assert len(_lines(out / "scores")) == 8  # the outputs are written all the same


@pytest.mark.slow
def test_avro_and_tfrecord_inputs_score_like_json_with_a_named_version(
    tmp_path, serving_dir, blueprint, blueprint_path, pii_key
):
    events = make_decisions(blueprint, 40, seed=2)
    with open(tmp_path / "decisions.avro", "wb") as f:
        avro.write_events(f, "decision", events)
    with tf.io.TFRecordWriter(str(tmp_path / "examples.tfrecord.gz"), options="GZIP") as writer:
        for event in events:
            example = features_to_example(event.features, blueprint, KEY.encode())
            example.features.feature["decision_id"].bytes_list.value.append(
                event.decision_id.encode()
            )
            writer.write(example.SerializeToString())
    expected = _expected_scores(events, blueprint, serving_dir / "1793534400")
    for name in ("decisions.avro", "examples.tfrecord.gz"):
        out = tmp_path / f"out-{name}"
        bulk_score.run([
            "--input", str(tmp_path / name), "--model_dir", str(serving_dir),
            "--model_version", "1793534400", "--blueprint", str(blueprint_path),
            "--output", str(out), "--seed", "3",
        ])  # fmt: skip
        rows = _lines(out / "scores")
        assert {r["decision_id"]: r["model_id"] for r in rows} == {
            d: "notify-1793534400" for d in expected
        }, name
        for row in rows:
            assert row["score"] == pytest.approx(expected[row["decision_id"]], rel=1e-6, abs=1e-7)
        assert _lines(out / "failed") == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_dir", "M", "--output", "O"], "exactly one of --input"),
        (["--input", "x.jsonl", "--output", "O"], "--model_dir is required"),
        (["--input", "x.jsonl", "--model_dir", "M"], "--output"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O", "--max_batch_size", "0"],
         "--max_batch_size must be at least 1"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O",
          "--min_batch_size", "9", "--max_batch_size", "3"], "larger than --max_batch_size"),
        (["--input", "x.tfrecord", "--model_dir", "{serving}", "--output", "O", "--log_decisions",
          "--blueprint", "{blueprint}"], "--log_decisions needs decision events"),
        (["--input", "x.jsonl", "--model_dir", "{missing}", "--output", "O",
          "--blueprint", "{blueprint}"], "does not exist"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--model_version", "7", "--output", "O",
          "--blueprint", "{blueprint}"], "has no model or version 7"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O"], "--blueprint is required"),
        (["--input", "{missing}/*.jsonl", "--model_dir", "{serving}", "--output", "O",
          "--blueprint", "{blueprint}"], "no files match --input"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O",
          "--max_failed_fraction", "1.5"], "--max_failed_fraction must be in [0, 1]"),
        # Misspelt and abbreviated flags are refused, not dropped with a warning by Beam.
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O",
          "--max_faild_fraction", "0.5"], "unknown argument '--max_faild_fraction'"),
        (["--input", "x.jsonl", "--model_dir", "{serving}", "--output", "O",
          "--max_failed", "0.5"], "unknown argument '--max_failed'"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_non_zero_with_one_line(
    args, message, serving_dir, blueprint_path, tmp_path, capsys, pii_key
):
    filled = [
        a.format(serving=serving_dir, blueprint=blueprint_path, missing=tmp_path / "none")
        for a in args
    ]
    assert bulk_score.main(filled) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("bulk_score: error:")


def test_missing_pii_key_exits_with_one_line(
    serving_dir, blueprint_path, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("LOOPLINE_PII_KEY", raising=False)
    status = bulk_score.main([
            "--input", "x.jsonl", "--model_dir", str(serving_dir), "--output", str(tmp_path),
            "--blueprint", str(blueprint_path),
        ])  # fmt: skip
    assert status == 2
    assert "LOOPLINE_PII_KEY" in capsys.readouterr().err


def test_batch_bounds_default_to_large_batches_and_honour_the_given_ones():
    assert bulk_score.batch_bounds(None, None) == (256, 2048)
    assert bulk_score.batch_bounds(None, 100) == (100, 100)
    assert bulk_score.batch_bounds(512, None) == (512, 2048)
    assert bulk_score.batch_bounds(4096, None) == (4096, 4096)
    assert bulk_score.batch_bounds(8, 32) == (8, 32)


@pytest.mark.slow
def test_stateful_batching_keeps_batches_within_bounds(
    tmp_path, serving_dir, blueprint, blueprint_path, pii_key
):
    # --max_batch_duration_secs makes BatchElements stateful; it must still see single rows.
    events = make_decisions(blueprint, 120, seed=4)
    source = write_decision_lines(tmp_path / "decisions.jsonl", events, [])
    out = tmp_path / "out"
    bulk_score.run([
        "--input", str(source), "--model_dir", str(serving_dir),
        "--blueprint", str(blueprint_path), "--output", str(out),
        "--min_batch_size", "8", "--max_batch_size", "32", "--max_batch_duration_secs", "5",
    ])  # fmt: skip

    assert sorted(r["decision_id"] for r in _lines(out / "scores")) == sorted(
        e.decision_id for e in events
    )
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = manifest["distributions"]["inference.inference_request_batch_size"]
    assert sizes["max"] <= 32


def test_a_tfrecord_whose_decision_id_is_not_utf8_is_a_dead_letter():
    example = tf.train.Example()
    example.features.feature["decision_id"].bytes_list.value.append(b"\xff")
    failure = key_example(example.SerializeToString())
    assert failure.reason == BAD_EXAMPLE and "not UTF-8" in failure.detail


@pytest.mark.parametrize(
    "scored, failed, allowed, exits",
    [(99, 1, 0.01, False), (98, 2, 0.01, True), (0, 5, 0.01, True), (0, 0, 0.0, False),
     (50, 50, 0.5, False), (10, 0, 0.0, False)],
)  # fmt: skip
def test_the_failed_share_is_compared_with_max_failed_fraction(scored, failed, allowed, exits):
    if exits:
        with pytest.raises(FailedRun, match="rows failed"):
            bulk_score.check_failed_fraction(scored, failed, allowed)
    else:
        bulk_score.check_failed_fraction(scored, failed, allowed)


def test_failed_rows_keep_no_raw_identifier(tmp_path, serving_dir, blueprint, blueprint_path):
    """A refused decision in failed/ keeps its shape with the blueprint's privacy applied:
    user_id pseudonymised, email dropped; a line that is not JSON keeps only its digest."""
    events = make_decisions(blueprint, 20, seed=3)
    refused = json.loads(events[0].to_json())
    refused.pop("event_time")  # missing_field: refused, with its features
    refused["decision_id"] = "refused-1"
    user, email = refused["features"]["user_id"], refused["features"]["email"]
    broken = '{"decision_id": "cut", "features": {"user_id": "' + user + '"'
    source = write_decision_lines(tmp_path / "d.jsonl", events, [json.dumps(refused), broken])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        args = _json_run_args(source, serving_dir, blueprint_path, tmp_path / "out")
        bulk_score.run([*args[:-1], "0.2"])
    written = "".join(p.read_text() for p in (tmp_path / "out" / "failed").glob("*.jsonl"))
    assert user not in written and email not in written
    failures = {f["reason"]: f["payload"] for f in _lines(tmp_path / "out" / "failed")}
    assert failures["missing_field"]["decision_id"] == "refused-1"
    assert "email" not in failures["missing_field"]["features"]
    assert set(failures["bad_json"]) == {"sha256", "length"}
