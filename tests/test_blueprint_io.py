"""pipelines.blueprint_io.read_blueprint: the one way every pipeline reads ``--blueprint``.

Local paths go through Beam's real LocalFileSystem. For a remote one, GCS is replaced at the
filesystem boundary by tests/fake_gcs.py: a Beam FileSystem that owns the ``gs`` scheme for the
test and serves objects from a local directory, found through the same ``FileSystems.open``
lookup that picks GCSFileSystem for ``gs://`` on Dataflow.
"""

from __future__ import annotations

import shutil

import pytest

from loopline.blueprint import BlueprintError, load_blueprint
from pipelines import bulk_score, join_decisions, monitor
from pipelines.blueprint_io import read_blueprint
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.fake_gcs import activate


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A bucket holding the example blueprint as ``gs://bucket/blueprints/notify.yaml``."""
    bucket = activate(monkeypatch, tmp_path / "gcs") / "bucket"
    (bucket / "blueprints").mkdir(parents=True)
    shutil.copy(EXAMPLE_BLUEPRINT, bucket / "blueprints" / "notify.yaml")
    return "gs://bucket/blueprints/notify.yaml"


def test_local_path_reads_the_same_blueprint_as_load_blueprint():
    read = read_blueprint(str(EXAMPLE_BLUEPRINT))
    loaded = load_blueprint(EXAMPLE_BLUEPRINT)
    assert read == loaded and read.content_hash == loaded.content_hash
    assert read.source == str(EXAMPLE_BLUEPRINT)


def test_remote_path_is_read_through_beams_filesystems(remote):
    blueprint = read_blueprint(remote)
    assert blueprint.content_hash == load_blueprint(EXAMPLE_BLUEPRINT).content_hash
    assert blueprint.source == remote  # errors and summaries name the path as given


def test_unreadable_path_names_the_file(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(BlueprintError, match="missing.yaml: <file>: cannot be read"):
        read_blueprint(missing)
    with pytest.raises(BlueprintError, match="cannot be read"):
        read_blueprint("nosuchscheme://bucket/notify.yaml")


def test_invalid_blueprint_is_refused_like_a_local_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(BlueprintError, match="is not valid YAML"):
        read_blueprint(str(bad))


def test_each_pipeline_reads_its_blueprint_through_it(remote, tmp_path):
    """The join, bulk scoring and monitoring accept a blueprint on a non-local filesystem."""
    expected = load_blueprint(EXAMPLE_BLUEPRINT).content_hash
    assert join_decisions._load_blueprint(remote).content_hash == expected
    options = bulk_score.BulkScoreOptions(["--blueprint", remote])
    assert bulk_score._blueprint(options, {}).content_hash == expected
    observations = tmp_path / "observations.jsonl"
    observations.write_text("")
    opts = monitor.MonitorOptions(
        [
            "--scores",
            str(observations),
            "--observations",
            str(observations),
            "--blueprint",
            remote,
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert monitor.resolve(opts).blueprint.content_hash == expected
