"""A small run of bench/join.py: the three contenders run and agree on what they produced."""

import json

import pytest

from bench.join import headline_ratios, main, median_run, pair_ratios


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


def test_headline_ratio_is_the_median_of_the_pair_ratios_not_the_ratio_of_median_runs():
    # Pair 2 sets a quiet identity run against a busy join run; the median runs (13 s, 10 s)
    # would give 1.3, the pairs 1.0, 2.17 and 1.5.
    runs = {
        "join": [{"seconds": 10.0, "cpu_seconds": 9.0}, {"seconds": 13.0, "cpu_seconds": 12.0},
                 {"seconds": 30.0, "cpu_seconds": 15.0}],
        "identity": [{"seconds": 10.0, "cpu_seconds": 9.0}, {"seconds": 6.0, "cpu_seconds": 6.0},
                     {"seconds": 20.0, "cpu_seconds": 10.0}],
    }  # fmt: skip
    assert pair_ratios(runs)["join_over_identity"] == pytest.approx([1.0, 13 / 6, 1.5])
    assert headline_ratios(runs) == {"join_over_identity": 1.5, "join_over_identity_cpu": 1.5}


def test_a_ratio_is_reported_only_when_both_of_its_contenders_ran():
    runs = {"join": [{"seconds": 2.0}], "duckdb": [{"seconds": 0.5}]}
    assert headline_ratios(runs) == {"join_over_duckdb": 4.0}
