"""`make demo` end to end, in a reduced size: every stage is the real entry point."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_writes_the_report(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.demo",
            "--workdir",
            str(workdir),
            "--days",
            "2",
            "--decisions_per_day",
            "2500",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in range(1, 10):
        assert f"[{stage}/9]" in out
    assert "== Loopline demo summary ==" in out

    summary = json.loads((workdir / "summary.json").read_text())
    first, second = summary["models"]
    assert first["blessed"] and first["name"].startswith("notify-")
    assert second["cycle"] == 2 and second["why"]  # blessed or not, the record says why
    assert summary["scored"] >= 2500
    live = summary["live"]["models"][first["model_id"]]["overall"]
    assert live["count"] >= 2500
    # The live model separates outcomes well above chance, close to what the truth allows.
    assert live["auc"] > 0.6
    assert live["auc"] <= summary["live_ground_truth_auc"] + 0.05

    report = workdir / "monitor" / "report.html"
    assert report.stat().st_size > 10_000
    for png in ("calibration.png", "score_distribution.png", "label_delay.png"):
        assert (workdir / "monitor" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every span the demo joined reconciles.
    manifests = list((workdir / "data" / "notify").glob("*/manifest.json"))
    assert len(manifests) == 3
    assert all(json.loads(m.read_text())["reconciles"] for m in manifests)
    # Scoring exits cleanly: no TensorFlow finalizer errors at interpreter shutdown.
    scoring_log = (workdir / "stage-logs" / "bulk_score.log").read_text()
    assert "scored" in scoring_log and "Exception ignored" not in scoring_log
    # The rollout stage: a truly better challenger earns production.
    assert summary["rollout"].startswith("rollout: promoted ")
    # Treatment-aware training is judged on the sent rows, next to the truth on those rows.
    assert first["observable_auc"] is not None and first["truth_observable_auc"] is not None
