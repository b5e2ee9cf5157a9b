"""Atomic spans (transforms/span_commit.py): a manifest lists exactly the files beside it.

Unit tests of the claim and commit on small files, then the join itself: a rerun with another
shard count, SIGTERM at random points of a rerun, and two writers at once (subprocesses, as a
scheduler would run them).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tensorflow as tf

from pipelines.join_decisions import run
from tests.fake_gcs import root_for
from tests.join_fixtures import join_args, simulate_logs
from transforms.manifest import MANIFEST, listed_files
from transforms.span_commit import (
    CLAIM,
    SpanClaimLost,
    TempFile,
    claim_span,
    claimant,
    commit_span,
    span_files,
    temp_dir,
)

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _consistent(span: Path) -> bool:
    """manifest == files, or no manifest (the two states a reader may ever see)."""
    manifest_path = span / MANIFEST
    if not manifest_path.exists():
        return True
    return listed_files(json.loads(manifest_path.read_text())) == span_files(str(span))


# ---------------------------------------------------------------------------------------------
# The protocol on plain files


def test_claim_removes_old_manifest_outputs_and_temp_debris(tmp_path):
    span = tmp_path / "span"
    old = [
        _write(span / MANIFEST, "{}"),
        _write(span / "examples/train/part-00000-of-00002.tfrecord.gz"),
        _write(span / "examples/train/beam-temp-part-1234/abc"),
        _write(span / "rejected/part-00000-of-00001.jsonl"),
        _write(span / ".temp-0123456789abcdef/global/train/f"),
        _write(span / "beam-temp-x/y"),
    ]
    unrelated = _write(span / "README.txt")
    claim_span(str(span), "run-a")
    assert not any(p.exists() for p in old)
    assert unrelated.exists()
    assert claimant(str(span)) == "run-a"


def _listing(written: dict) -> dict:
    """A manifest of just the files: paths per output, records per path."""
    return {
        "files": {output: [path for path, _ in files] for output, files in written.items()},
        "records": {path: n for files in written.values() for path, n in files},
    }


def test_commit_writes_manifest_listing_every_file_with_its_records(tmp_path):
    span = str(tmp_path / "span")
    claim_span(span, "run-a")
    temp = Path(temp_dir(span, "run-a"))
    files = [
        TempFile("rejected", str(_write(temp / "r1", '{"a":1}\n{"a":2}\n')), 2, None),
        TempFile("rejected", str(_write(temp / "r2", '{"a":3}\n')), 1, None),
    ]
    manifest = commit_span(span, "run-a", files, None, _listing)
    assert listed_files(manifest) == span_files(span)
    # Empty train, eval, unmatched_observations and late files, then the two rejected ones.
    assert sorted(manifest["records"].values()) == [0, 0, 0, 0, 1, 2]
    assert not (tmp_path / "span" / CLAIM).exists()


def test_commit_refuses_when_another_run_claimed_the_span_since(tmp_path):
    span = str(tmp_path / "span")
    claim_span(span, "run-a")
    temp = _write(Path(temp_dir(span, "run-a")) / "r1", "{}\n")
    claim_span(span, "run-b")
    with pytest.raises(SpanClaimLost, match="run-b") as refused:
        commit_span(span, "run-a", [TempFile("rejected", str(temp), 1, None)], None, dict)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "span" / MANIFEST).exists()
    assert not list((tmp_path / "span").glob("rejected/*"))


def test_a_refused_commit_removes_its_own_temp_files(tmp_path):
    span = str(tmp_path / "span")
    claim_span(span, "run-a")
    temp = _write(Path(temp_dir(span, "run-a")) / "r1", "{}\n")
    claim_span(span, "run-b")
    temp = _write(temp, "{}\n")  # written after run-b cleared the span: a slow loser
    with pytest.raises(SpanClaimLost):
        commit_span(span, "run-a", [TempFile("rejected", str(temp), 1, None)], None, dict)
    assert not temp.exists()


# ---------------------------------------------------------------------------------------------
# The join, rerun, killed and doubled


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return simulate_logs(tmp_path_factory.mktemp("logs"), seed=5, decisions=300)


_args = join_args


def _records(span: Path) -> int:
    files = sorted(str(p) for p in span.glob("examples/*/*.tfrecord.gz"))
    return sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))


def test_rerun_with_another_shard_count_leaves_only_the_new_files(logs, tmp_path, pii_key):
    span = tmp_path / "notify" / "2026-11-01"
    run(_args(logs, span, "--num_shards", "3"))
    manifest = run(_args(logs, span, "--num_shards", "1"))
    assert listed_files(manifest) == span_files(str(span))
    assert len(manifest["files"]["train"]) == 1
    assert _records(span) == manifest["examples_written"]
    assert sum(manifest["records_per_file"].values()) == (
        manifest["examples_written"]
        + manifest["observations_orphan"]
        + manifest["observations_out_of_window"]
        + manifest["rejected_decisions"]
        + manifest["rejected_observations"]
    )


def _join_process(logs: Path, span: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, LOOPLINE_PII_KEY="atomic-test-key")
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.join_decisions", *_args(logs, span, *extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_at_random_points_of_a_rerun_never_leaves_a_mixed_span(logs, tmp_path):
    span = tmp_path / "notify" / "2026-11-01"
    started = time.monotonic()
    first = _join_process(logs, span, "--num_shards", "3")
    assert first.wait() == 0, first.stderr.read()
    duration = time.monotonic() - started
    rng = random.Random(20261101)
    for attempt in range(3):
        rerun = _join_process(logs, span, "--num_shards", str(attempt + 1))
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        rerun.send_signal(signal.SIGTERM)
        rerun.communicate()
        assert _consistent(span), f"attempt {attempt}: {span_files(str(span))}"
    final = _join_process(logs, span, "--num_shards", "2")
    assert final.wait() == 0, final.stderr.read()
    manifest = json.loads((span / MANIFEST).read_text())
    assert listed_files(manifest) == span_files(str(span))
    assert _records(span) == manifest["examples_written"]


@pytest.mark.slow
def test_two_concurrent_writers_never_mix_files(logs, tmp_path):
    span = tmp_path / "notify" / "2026-11-01"
    writers = [_join_process(logs, span, "--num_shards", n) for n in ("2", "3")]
    outcomes = [(w.wait(), w.stderr.read()) for w in writers]
    refused = [err for code, err in outcomes if code != 0]
    assert len(refused) <= 1, refused
    assert all("SpanClaimLost" in err and "another writer" in err for err in refused)
    assert _consistent(span), span_files(str(span))
    if (span / MANIFEST).exists():
        assert _records(span) == json.loads((span / MANIFEST).read_text())["examples_written"]
    else:  # one finished and, releasing its claim, removed the other's newer one: it refused
        assert refused


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """A bucket of the in-process fake GCS (tests/fake_gcs.py): only objects, no directories,
    rename a copy then a delete; ``gs://bucket/x`` is the file ``bucket.local / "x"``."""
    return root_for("gs", tmp_path, monkeypatch)


def test_the_join_rewrites_a_span_on_an_object_store_atomically(logs, bucket, pii_key):
    span, local = bucket / "notify/2026-11-01", bucket.local / "notify/2026-11-01"
    stale = local / "examples/train/part-00007-of-00009.tfrecord.gz"
    for path, data in (
        (stale, b"left by an older run with 9 shards"),
        (local / "examples/eval/beam-temp-part-1/x", b"debris of a killed sink"),
        (local / MANIFEST, b'{"files": {}}'),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = run(_args(logs, span, "--num_shards", "2"))
    assert listed_files(manifest) == span_files(span)
    assert not stale.exists()
    assert json.loads((local / MANIFEST).read_text()) == manifest
    listed = manifest["files"]["train"] + manifest["files"]["eval"]
    paths = [str(local / path.removeprefix(f"{span}/")) for path in listed]
    records = tf.data.TFRecordDataset(paths, compression_type="GZIP")
    assert sum(1 for _ in records) == manifest["examples_written"]
