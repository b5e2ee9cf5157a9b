"""A small run of bench/join.py: the three contenders run and agree on what they produced."""

import json

import pytest

from bench.join import main, median_run


@pytest.mark.slow
def test_bench_runs_all_three_contenders_on_the_same_logs(tmp_path, capsys):
    out = tmp_path / "join.json"
    summary = main(["--decisions", "2000", "--days", "1", "--work", str(tmp_path / "work"),
                    "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == summary
    results = summary["results"]
    assert set(results) == {"join", "identity", "duckdb"}
    assert summary["decisions"] == 2000 and summary["events"] > 2000
    for result in results.values():
        assert result["seconds"] > 0 and result["peak_rss_mb"] > 0 and result["events_per_s"] > 0
        assert result["cpu_seconds"] > 0
    join, duckdb = results["join"], results["duckdb"]
    assert join["reconciles"] is True and join["examples"] == 2000
    # DuckDB's reference join is laxer about malformed decisions (it does not type-check
    # features), so it may keep a few that the join rejects, never fewer.
    assert join["examples"] <= duckdb["examples"] <= join["examples"] + join["rejected_decisions"]
    assert abs(duckdb["observed"] - join["observed"]) <= join["rejected_decisions"]
    assert summary["ratios"]["join_over_identity"] == pytest.approx(
        join["seconds"] / results["identity"]["seconds"], rel=0.02
    )
    assert summary["ratios"]["join_over_identity_cpu"] == pytest.approx(
        join["cpu_seconds"] / results["identity"]["cpu_seconds"], rel=0.02
    )
    printed = capsys.readouterr().out
    assert "join_over_identity" in printed and "events/s" in printed


def test_repeated_runs_report_the_median_run_with_every_time():
    runs = [{"seconds": 3.0, "n": 1}, {"seconds": 1.0, "n": 2}, {"seconds": 2.0, "n": 3}]
    assert median_run(runs) == {"seconds": 2.0, "n": 3, "all_seconds": [3.0, 1.0, 2.0]}
    assert median_run(runs[:2])["seconds"] == 1.0  # the lower middle of an even count
