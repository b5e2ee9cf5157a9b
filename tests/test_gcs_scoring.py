"""pipelines.bulk_score and pipelines.monitor reading and writing gs:// (the GCS emulator).

The same fixtures and checks as tests/test_bulk_score.py (one model, and both arms of a rollout
as tests/test_bulk_score_arms.py) and tests/test_monitor.py, with every input, the blueprint,
the serving dir (the registry's aliases.json, the records and the SavedModels, which
TensorFlow loads from gs://) and every output on gs://.
"""

import json
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import bulk_score, monitor
from tests.scoring_fixtures import export_scoring_model, make_decisions, write_decision_lines
from tests.test_bulk_score import CORRUPT, KEY, _expected_scores
from tests.test_bulk_score_arms import (
    CHALLENGER_ID,
    CHALLENGER_VERSION,
    PRODUCTION_ID,
    PRODUCTION_VERSION,
    client_arms,
)
from tests.test_monitor import MODELS, independent_metrics, make_fixture


def _upload(local: Path, url: str) -> None:
    with FileSystems.create(url) as f:
        f.write(local.read_bytes())


def _upload_tree(local: Path, url: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        _upload(path, f"{url}/{path.relative_to(local)}")


def _rows(pattern: str) -> list[dict]:
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows += [json.loads(line) for line in f.read().decode().splitlines()]
    return rows


@pytest.fixture(scope="module")
def scored(gcs_emulator, tmp_path_factory, blueprint, blueprint_path):
    local = tmp_path_factory.mktemp("scoring")
    serving = local / "serving"
    export_scoring_model(blueprint, serving / "1793534400", seed=1)
    events = make_decisions(blueprint, 120, seed=4)
    root = gcs_emulator.url("scoring")
    _upload(write_decision_lines(local / "decisions.jsonl", events, CORRUPT),
            f"{root}/in/decisions.jsonl")  # fmt: skip
    _upload(blueprint_path, f"{root}/in/notify.yaml")
    _upload_tree(serving, f"{root}/serving")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        bulk_score.run([
            "--input", f"{root}/in/decisions.jsonl", "--model_dir", f"{root}/serving",
            "--blueprint", f"{root}/in/notify.yaml", "--output", f"{root}/out",
            "--log_decisions", "--min_batch_size", "8", "--max_batch_size", "32",
            "--max_failed_fraction", "0.05",
        ])  # fmt: skip
    expected = _expected_scores(events, blueprint, serving / "1793534400")
    return f"{root}/out", expected


@pytest.mark.slow
def test_bulk_score_on_gcs_writes_the_models_own_score_for_every_decision(scored):
    output, expected = scored
    rows = _rows(f"{output}/scores/*.jsonl")
    assert sorted(r["decision_id"] for r in rows) == sorted(expected)
    for row in rows:
        assert row["score"] == pytest.approx(expected[row["decision_id"]], rel=1e-6, abs=1e-7)
        assert row["model_id"] == "notify-1793534400"


@pytest.mark.slow
def test_bulk_score_on_gcs_writes_unparseable_rows_to_failed(scored):
    output, _ = scored
    failed = _rows(f"{output}/failed/*.jsonl")
    assert sorted(f["reason"] for f in failed) == ["bad_json", "missing_field"]


@pytest.mark.slow
def test_bulk_score_on_gcs_logs_every_scored_decision(scored):
    output, expected = scored
    logged = _rows(f"{output}/decisions/*.jsonl")
    assert sorted(d["decision_id"] for d in logged) == sorted(expected)


@pytest.fixture(scope="module")
def two_arms_scored(gcs_emulator, tmp_path_factory, blueprint, blueprint_path):
    """The rollout mode on gs://: production and challenger both registered in the serving dir
    (aliases.json, records and SavedModels on the emulator)."""
    local = tmp_path_factory.mktemp("two_arms")
    serving = local / "serving"
    export_scoring_model(blueprint, serving / PRODUCTION_VERSION, seed=1)
    export_scoring_model(blueprint, serving / CHALLENGER_VERSION, seed=2, production=False)
    events = make_decisions(blueprint, 120, seed=5)
    root = gcs_emulator.url("two-arms")
    _upload(write_decision_lines(local / "decisions.jsonl", events), f"{root}/in/decisions.jsonl")
    _upload_tree(serving, f"{root}/serving")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        bulk_score.run([
            "--input", f"{root}/in/decisions.jsonl", "--model_dir", f"{root}/serving",
            "--blueprint", str(blueprint_path), "--output", f"{root}/out", "--log_decisions",
            "--min_batch_size", "8", "--max_batch_size", "32",
        ])  # fmt: skip
    expected = {
        arm: _expected_scores(events, blueprint, serving / version)
        for arm, version in (("production", PRODUCTION_VERSION), ("challenger", CHALLENGER_VERSION))
    }
    return f"{root}/out", client_arms(blueprint, events), expected


@pytest.mark.slow
def test_bulk_score_on_gcs_serves_each_unit_its_arms_model(two_arms_scored):
    output, arms, expected = two_arms_scored
    rows = _rows(f"{output}/scores/*.jsonl")
    assert {r["decision_id"]: r["arm"] for r in rows} == arms
    ids = {"production": PRODUCTION_ID, "challenger": CHALLENGER_ID}
    for row in rows:
        assert row["model_id"] == ids[row["arm"]]
        assert row["score"] == pytest.approx(
            expected[row["arm"]][row["decision_id"]], rel=1e-6, abs=1e-7
        )
    logged = _rows(f"{output}/decisions/*.jsonl")
    assert {d["decision_id"]: d["arm"] for d in logged} == arms


@pytest.fixture(scope="module")
def monitored(gcs_emulator, tmp_path_factory):
    local = tmp_path_factory.mktemp("monitor")
    expected, _ = make_fixture(local)
    root = gcs_emulator.url("monitor")
    for name in ("scores.jsonl", "decisions.jsonl", "observations.jsonl", "notify.yaml"):
        _upload(local / name, f"{root}/in/{name}")
    monitor.run([
        "--scores", f"{root}/in/scores.jsonl", "--decisions", f"{root}/in/decisions.jsonl",
        "--observations", f"{root}/in/observations.jsonl", "--blueprint", f"{root}/in/notify.yaml",
        "--output", f"{root}/out",
    ])  # fmt: skip
    return f"{root}/out", expected


@pytest.mark.slow
def test_monitor_on_gcs_writes_metrics_equal_to_an_independent_computation(monitored):
    output, expected = monitored
    with FileSystems.open(f"{output}/metrics.json") as f:
        written = json.loads(f.read())
    assert set(written["models"]) == set(MODELS)
    groups = {}
    for row in expected:
        groups.setdefault((row["model_id"], "all"), []).append(row)
        groups.setdefault((row["model_id"], row["day"]), []).append(row)
    for (model_id, day), rows in groups.items():
        model = written["models"][model_id]
        got = model["overall"] if day == "all" else model["days"][day]
        for key, value in independent_metrics(rows).items():
            assert got[key] == pytest.approx(value, abs=1e-9), (model_id, day, key)


@pytest.mark.slow
def test_monitor_on_gcs_writes_its_report_and_plots(monitored):
    output, _ = monitored
    for name in ("report.html", "calibration.png", "score_distribution.png"):
        assert FileSystems.exists(f"{output}/{name}"), name
