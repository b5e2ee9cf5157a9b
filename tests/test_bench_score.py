"""bench.score runs end to end on a small input and reports what the README quotes."""

import json

import pytest

from bench.score import main


@pytest.mark.slow
def test_small_run_reports_ratios_side_by_side(tmp_path, pii_key):
    output = tmp_path / "score.json"
    report = main([
        "--rows", "600", "--batch_size", "64", "--repeat", "2", "--sweep", "32",
        "--sweep_rows", "200", "--sweep_repeat", "1", "--output", str(output),
    ])  # fmt: skip

    assert json.loads(output.read_text()) == report
    assert report["pipeline"]["scored"] == report["plain_loop_same_work"]["scored"] == 600
    assert len(report["ratios_of_each_pair"]) == 2
    assert report["ratio"] == pytest.approx(
        report["pipeline"]["rows_per_s"] / report["plain_loop_same_work"]["rows_per_s"], abs=1e-3
    )
    assert report["pipeline"]["batch_sizes_seen"]["max"] <= 64
    assert report["model"]["parameters"] > 300_000
    [point] = report["sweep"]
    assert point["batch_size"] == 32 and point["pipeline_batch_sizes_seen"]["max"] <= 32
    assert len(point["ratios_of_each_pair"]) == 1


@pytest.mark.parametrize("flag", ["--repeat", "--sweep_repeat"])
def test_repeats_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit):
        main([flag, "0"])
    assert f"{flag} must be at least 1" in capsys.readouterr().err
