"""pipelines.bulk_score and pipelines.monitor reading and writing gs:// (the GCS emulator).

The same fixtures and checks as tests/test_bulk_score.py and tests/test_monitor.py, with every
input, the blueprint, the serving dir (the registry's aliases.json, the record and the
SavedModel, which TensorFlow loads from gs://) and every output on gs://.
"""

import json
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import bulk_score, monitor
from tests.scoring_fixtures import export_scoring_model, make_decisions, write_decision_lines
from tests.test_bulk_score import CORRUPT, KEY, _expected_scores
from tests.test_monitor import MODELS, independent_metrics, make_fixture


def _upload(local: Path, url: str) -> None:
    with FileSystems.create(url) as f:
        f.write(local.read_bytes())


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
    for path in sorted(p for p in serving.rglob("*") if p.is_file()):
        _upload(path, f"{root}/serving/{path.relative_to(serving)}")
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
