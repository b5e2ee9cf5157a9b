"""Observations not learned from (orphans, out of window) keep no raw private field."""

import json

from pipelines import join_decisions


def test_unmatched_observations_keep_no_raw_identifier(tmp_path, monkeypatch, blueprint_path):
    monkeypatch.setenv("LOOPLINE_PII_KEY", "test-key-not-a-secret")
    (tmp_path / "d.jsonl").write_text("")
    orphan = {"decision_id": "nobody", "event_time": "2026-11-01T12:00:00Z",
              "observations": {"click": 1, "user_id": "u-secret-77", "email": "me@example.com"}}  # fmt: skip
    (tmp_path / "o.jsonl").write_text(json.dumps(orphan) + "\n")
    manifest = join_decisions.run([
        "--decisions", str(tmp_path / "d.jsonl"), "--observations", str(tmp_path / "o.jsonl"),
        "--blueprint", str(blueprint_path), "--output", str(tmp_path / "span"),
    ])  # fmt: skip
    assert manifest["observations_orphan"] == 1
    written = "".join(p.read_text() for p in (tmp_path / "span").rglob("*.jsonl"))
    assert "u-secret-77" not in written and "me@example.com" not in written
    [line] = written.splitlines()
    kept = json.loads(line)["event"]["observations"]
    assert kept["click"] == 1 and "email" not in kept and len(kept["user_id"]) == 64
