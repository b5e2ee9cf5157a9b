"""pipelines.model_record.write: where a run's record goes, locally and on gs://.

What the record holds is checked on a real TFX run in tests/test_train.py (slow)."""

import json
import uuid

import pytest

from loopline import registry
from pipelines import model_record
from tests.fake_gcs import root_for


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, monkeypatch):
    return root_for(request.param, tmp_path, monkeypatch)


def record(version):
    return {
        "run_id": "2026-11-05T06:00:00.123",
        "model_id": str(uuid.uuid4()) if version else None,
        "name": f"notify-{version}" if version else None,
        "version": version,
        "blessed": version is not None,
        "pushed": version is not None,
        "blueprint": {"name": "notify"},
    }


def test_every_run_is_recorded_under_the_pipeline_root(root):
    paths = model_record.write(record(None), root / "pipeline_root", root / "serving")
    assert paths == [root / "pipeline_root/records/2026-11-05T06-00-00.123.json"]
    written = json.loads(
        (root.local / "pipeline_root/records/2026-11-05T06-00-00.123.json").read_text()
    )
    assert written == record(None)
    assert not (root.local / "serving").exists()


def test_a_pushed_model_is_recorded_next_to_its_version_where_the_registry_reads_it(root):
    pushed = record("1793534400")
    (root.local / "serving" / "1793534400").mkdir(parents=True)
    (root.local / "serving" / "1793534400" / "saved_model.pb").write_bytes(b"placeholder")
    model_record.write(pushed, root / "pipeline_root", root / "serving")
    registry.register(root / "serving", pushed)
    model = registry.resolve(root / "serving", pushed["model_id"], "notify")
    assert (model.version, model.record["name"]) == ("1793534400", "notify-1793534400")
