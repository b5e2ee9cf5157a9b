"""The registry, span discovery and training's example checks on the real GCS emulator.

tests/test_registry.py and tests/test_spans.py run the same code on an in-process fake of
gs://; here every call goes through Beam's GCSFileSystem (and TensorFlow for the examples) to
``gcp-storage-emulator``, as in production.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from loopline import registry, storage
from loopline.spans import find_spans
from pipelines.train_examples import check_examples_match_blueprint
from tests.train_fixtures import write_span


def push(serving: str, version: str) -> dict:
    """What the Pusher and the model record leave on gs:// for one pushed version."""
    storage.write_bytes(f"{serving}/{version}/saved_model.pb", b"placeholder")
    record = {
        "model_id": str(uuid.uuid4()),
        "name": f"notify-{version}",
        "version": version,
        "blessed": True,
        "pushed": True,
        "blueprint": {"name": "notify"},
    }
    storage.write_json(f"{serving}/{version}.record.json", record)
    return record


def test_a_push_becomes_the_challenger_and_promotion_moves_it_to_production(gcs_path):
    serving = f"{gcs_path}/serving/notify"
    first, second = push(serving, "100"), push(serving, "200")
    registry.register(serving, first)
    registry.promote(serving, "challenger_better", challenger=first["model_id"])
    registry.register(serving, second)
    aliases = registry.read_aliases(serving)
    assert (aliases.production, aliases.challenger) == (first["model_id"], second["model_id"])
    assert registry.resolve(serving, "production").version == "100"
    assert registry.resolve(serving, "challenger").version == "200"
    assert registry.resolve(serving, second["model_id"]).version == "200"


def test_rolling_back_production_restores_the_previous_model(gcs_path):
    serving = f"{gcs_path}/serving/notify"
    first, second = push(serving, "100"), push(serving, "200")
    for record in (first, second):
        registry.register(serving, record)
        registry.promote(serving, "challenger_better", challenger=record["model_id"])
    registry.roll_back(serving, "a bad day", alias="production")
    aliases = registry.read_aliases(serving)
    assert aliases.production == first["model_id"] and aliases.previous is None
    moves = json.loads(storage.read_text(registry.aliases_path(serving)))["history"]
    assert [m["alias"] for m in moves][-2:] == ["production", "previous"]
    assert moves[-2]["why"] == "rolled back: a bad day"


def test_an_alias_pointing_at_nothing_is_one_sentence(gcs_path):
    serving = f"{gcs_path}/serving/notify"
    registry.register(serving, push(serving, "100"))
    with pytest.raises(registry.ModelNotFound, match="has no production model"):
        registry.resolve(serving, "production")


@pytest.fixture(scope="module")
def dataset_on_gcs(gcs_emulator, blueprint, tmp_path_factory) -> str:
    """Two spans written locally by the training fixtures, uploaded under a gs:// root; the
    second day's span has no manifest yet (a join still writing it)."""
    local = tmp_path_factory.mktemp("spans")
    root = gcs_emulator.url(f"data-{uuid.uuid4().hex[:8]}")
    for day, date in enumerate(("2026-11-01", "2026-11-02")):
        write_span(local / "notify" / date, blueprint, n=200, seed=day, day=day)
    (local / "notify" / "2026-11-02" / "manifest.json").unlink()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{root}/{path.relative_to(local)}", Path(path).read_bytes())
    return root


def test_span_discovery_on_gcs_passes_over_an_incomplete_span(dataset_on_gcs):
    (span,) = find_spans(dataset_on_gcs, "notify", newest=1)
    assert span.date == "2026-11-01" and span.uri.startswith("gs://")
    assert span.example_files("train") and span.example_files("eval")


def test_training_checks_the_examples_on_gcs_against_the_blueprint(dataset_on_gcs, blueprint):
    spans = find_spans(dataset_on_gcs, "notify", newest=1)
    check_examples_match_blueprint(spans, blueprint)  # raises on a mismatch


def test_the_monitor_takes_a_statisticsgen_directory_on_gcs(gcs_path, tmp_path):
    """The DAG passes StatisticsGen's output uri: on GCS a prefix with objects, not an object."""
    from pipelines import monitor

    stats = f"{gcs_path}/pipeline_root/StatisticsGen/statistics/4"
    storage.write_bytes(f"{stats}/Split-train/FeatureStats.pb", b"stats")
    (tmp_path / "s.jsonl").write_text("")
    base = ["--scores", str(tmp_path / "s.jsonl"), "--decisions", str(tmp_path / "s.jsonl"),
            "--observations", str(tmp_path / "s.jsonl"), "--blueprint", "examples/notify.yaml",
            "--output", str(tmp_path / "out")]  # fmt: skip
    options = monitor.MonitorOptions([*base, "--training_stats", stats])
    monitor._checked(options)  # a directory of objects is accepted
    missing = monitor.MonitorOptions([*base, "--training_stats", f"{gcs_path}/nothing/here"])
    with pytest.raises(monitor.MonitorError, match="does not exist"):
        monitor._checked(missing)
