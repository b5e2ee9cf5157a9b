"""pipelines.monitor end to end on a small hand-built fixture, checked against an independent
computation of the labels and metrics from the raw events."""

import json
import math
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from loopline.events import DecisionEvent
from loopline.readout import monitor_settings
from pipelines import monitor
from pipelines.blueprint_io import read_blueprint
from transforms.join import DEFAULT, OBSERVED, JoinedDecision
from transforms.monitoring import (
    AttachScores,
    DelayBins,
    LabelDelayHistogram,
    MonitoredDecision,
)
from transforms.score_rows import (
    ScoreRow,
    parse_score_row,
)

BLUEPRINT = """
name: notify
version: 2
features:
  - {name: tenure_days, type: int}
  - {name: country, type: string}
  - {name: open_rate, type: float}
label: {name: clicked, observation: click, aggregation: max, window: 1h,
        backward_slack: 2m, default: 0}
monitor: {min_auc: 0.6, max_calibration_error: 0.1, min_count: 1}
"""
START = datetime(2026, 11, 1, 6, tzinfo=timezone.utc)
WINDOW_MS = 3_600_000
SLACK_MS = 120_000
MODELS = ("notify-100", "notify-200")


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def make_fixture(root, n=240, seed=3, tenure_shift=0):
    """Decisions over two UTC days served by two models, their score rows and observations.

    Model notify-200's decisions click more often (a known A/B difference). Observations land
    inside the window, after it (out of window), slightly before the decision (within the
    backward slack), or not at all; a few are repeated or orphans.
    Returns the expected per-decision rows computed straight from the rules.
    """
    rng = random.Random(seed)
    decisions, scores, observations, expected = [], [], [], []
    for i in range(n):
        model_id = MODELS[i % 2]
        decided = START + timedelta(minutes=9 * i)  # 240 decisions span two UTC days
        td = int(decided.timestamp() * 1000)
        score = round(rng.random(), 4)
        boost = 0.15 if model_id == MODELS[1] else 0.0
        clicks = rng.random() < min(0.95, 0.1 + 0.6 * score + boost)
        features = {
            "tenure_days": int(rng.gauss(100 + tenure_shift, 10)),
            "country": rng.choice(["KR", "US", "DE"]),
            "open_rate": rng.random(),
        }
        propensity = 0.025 if rng.random() < 0.1 else 0.975
        decision = int(score >= 0.5) if propensity > 0.5 else int(score < 0.5)
        decisions.append(
            {
                "decision_id": f"d-{i}",
                "decision_type": "notify",
                "event_time": _iso(decided),
                "features": features,
            }
        )
        scores.append(
            {
                "decision_id": f"d-{i}",
                "score": score,
                "decision": decision,
                "propensity": propensity,
                "explored": propensity < 0.5,
                "model_id": model_id,
                "scored_at": "2026-11-30T00:00:00Z",
            }
        )
        label = 0
        kind = rng.random()
        if clicks and kind < 0.8:
            offset = rng.randrange(0, WINDOW_MS + 1)
            label = 1
        elif clicks and kind < 0.9:
            offset = -rng.randrange(0, SLACK_MS + 1)
            label = 1
        elif clicks:
            offset = WINDOW_MS + rng.randrange(1, 3 * WINDOW_MS)  # too late to count
        else:
            offset = None
        if offset is not None:
            obs = {"decision_id": f"d-{i}", "event_time": td + offset, "observations": {"click": 1}}
            observations.append(obs)
            if rng.random() < 0.1:
                observations.append(dict(obs))  # at-least-once delivery
        if rng.random() < 0.2:
            observations.append(
                {"decision_id": f"d-{i}", "event_time": td + 60_000, "observations": {"open": 1}}
            )
        expected.append(
            {
                "model_id": model_id,
                "day": decided.strftime("%Y-%m-%d"),
                "score": score,
                "label": label,
                "decision": decision,
                "explored": propensity < 0.5,
            }
        )
    observations.append(
        {"decision_id": "nobody", "event_time": _iso(START), "observations": {"click": 1}}
    )
    rng.shuffle(observations)
    for name, rows in (
        ("decisions", decisions),
        ("scores", scores),
        ("observations", observations),
    ):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "notify.yaml").write_text(BLUEPRINT)
    return expected, decisions


def brute_force_auc(rows):
    pos = [r["score"] for r in rows if r["label"]]
    neg = [r["score"] for r in rows if not r["label"]]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def independent_metrics(rows):
    n = len(rows)
    eps = 1e-15
    loss = (
        -sum(
            math.log(min(max(r["score"], eps), 1 - eps))
            if r["label"]
            else math.log(1 - min(max(r["score"], eps), 1 - eps))
            for r in rows
        )
        / n
    )
    bins = {}
    for r in rows:
        bins.setdefault(min(int(r["score"] * 10), 9), []).append(r)
    ece = (
        sum(
            len(b) * abs(sum(r["score"] for r in b) / len(b) - sum(r["label"] for r in b) / len(b))
            for b in bins.values()
        )
        / n
    )
    return {
        "count": n,
        "positives": sum(r["label"] for r in rows),
        "label_rate": sum(r["label"] for r in rows) / n,
        "mean_score": sum(r["score"] for r in rows) / n,
        "auc": brute_force_auc(rows),
        "log_loss": loss,
        "calibration_error": ece,
        "decision_rate": sum(r["decision"] for r in rows) / n,
        "exploration_share": sum(r["explored"] for r in rows) / n,
    }


def training_stats(path, decisions):
    """TFDV statistics of the unshifted training features, as StatisticsGen would write them."""
    import tensorflow_data_validation as tfdv

    frame = pd.DataFrame([d["features"] for d in decisions])
    stats = tfdv.generate_statistics_from_dataframe(frame)
    path.write_bytes(stats.SerializeToString())
    return path


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    train_root = tmp_path_factory.mktemp("train")
    _, train_decisions = make_fixture(train_root, n=400, seed=11)
    stats = training_stats(root / "FeatureStats.pb", train_decisions)
    # Serving decisions have tenure shifted by +40 days: the skew report must notice.
    expected, _ = make_fixture(root, tenure_shift=40)
    out = root / "out"
    metrics = monitor.run(
        [
            "--scores",
            str(root / "scores.jsonl"),
            "--decisions",
            str(root / "decisions.jsonl"),
            "--observations",
            str(root / "observations.jsonl"),
            "--blueprint",
            str(root / "notify.yaml"),
            "--output",
            str(out),
            "--training_stats",
            str(stats),
        ]
    )
    return metrics, expected, out


def _bigquery_rows(path, parse, column) -> list[dict]:
    """Events as BigQuery returns them: TIMESTAMP as a datetime, JSON columns as strings."""
    rows = []
    for line in path.read_text().splitlines():
        event = parse(line)
        if hasattr(event, "reason"):
            continue
        row = event.to_dict()
        row["event_time"] = datetime.fromtimestamp(event.event_time_ms / 1000, timezone.utc)
        row[column] = json.dumps(row[column])
        rows.append(row)
    return rows


@pytest.mark.slow
def test_bigquery_tables_are_monitored_like_the_same_files(monitored, tmp_path, monkeypatch):
    """The monitor reads what the join reads: the same events from BigQuery tables (faked at
    the client boundary, ReadFromBigQuery; no emulator takes Beam's export) give the same
    metrics as from files."""
    from loopline.events import parse_decision_json, parse_observation_json

    metrics, _, out = monitored
    root = out.parent
    tables = {
        "p:logs.decisions": _bigquery_rows(
            root / "decisions.jsonl", parse_decision_json, "features"
        ),
        "p:logs.observations": _bigquery_rows(
            root / "observations.jsonl", parse_observation_json, "observations"
        ),
    }
    read = []

    def from_table(table, **kwargs):
        read.append(table)
        return beam.Create(tables[table])

    monkeypatch.setattr(beam.io, "ReadFromBigQuery", from_table)
    from_tables = monitor.run(
        [
            "--scores", str(root / "scores.jsonl"),
            "--decisions_table", "p:logs.decisions",
            "--observations_table", "p:logs.observations",
            "--blueprint", str(root / "notify.yaml"),
            "--output", str(tmp_path / "out"),
            "--training_stats", str(root / "FeatureStats.pb"),
        ]
    )  # fmt: skip
    assert sorted(read) == ["p:logs.decisions", "p:logs.observations"]
    assert all(tables.values())

    def comparable(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in ("generated_at", "inputs", "skew", "report")}

    assert comparable(from_tables) == comparable(metrics)
    assert from_tables["skew"]["features"] == metrics["skew"]["features"]


def test_a_glob_and_a_table_of_the_same_events_are_refused(tmp_path, capsys):
    args = [*_small_inputs(tmp_path, CLICKS), "--observations_table", "p:logs.observations"]
    assert monitor.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["monitor: error: give --observations or --observations_table, not both"]


@pytest.mark.slow
def test_metrics_json_equals_an_independent_computation(monitored):
    metrics, expected, out = monitored
    written = json.loads((out / "metrics.json").read_text())
    assert set(written["models"]) == set(MODELS)
    groups = {}
    for row in expected:
        groups.setdefault((row["model_id"], "all"), []).append(row)
        groups.setdefault((row["model_id"], row["day"]), []).append(row)
    assert {d for m in written["models"].values() for d in m["days"]} == {
        "2026-11-01",
        "2026-11-02",
    }
    for (model_id, day), rows in groups.items():
        model = written["models"][model_id]
        got = model["overall"] if day == "all" else model["days"][day]
        for key, value in independent_metrics(rows).items():
            assert got[key] == pytest.approx(value, abs=1e-9), (model_id, day, key)


@pytest.mark.slow
def test_accounting_and_label_delays(monitored):
    metrics, expected, _ = monitored
    inputs = metrics["inputs"]
    assert inputs["attach_scores.decisions_monitored"] == len(expected)
    assert inputs.get("attach_scores.decisions_without_score", 0) == 0
    assert inputs["join.observations_orphan"] == 1
    delay = metrics["label_delay"]
    # Every counted observation of a click label lies inside the histogram's range.
    assert delay["counted_observations"] == sum(delay["counted"])
    assert delay["observations"] == sum(delay["counts"]) + delay["below"] + delay["above"]
    assert delay["above"] > 0  # the late clicks


@pytest.mark.slow
def test_ab_compares_the_two_models_in_plain_words(monitored):
    metrics, expected, _ = monitored
    (comparison,) = metrics["ab"]["models"]
    a = [r["label"] for r in expected if r["model_id"] == "notify-100"]
    b = [r["label"] for r in expected if r["model_id"] == "notify-200"]
    pa, pb = sum(a) / len(a), sum(b) / len(b)
    pooled = (sum(a) + sum(b)) / (len(a) + len(b))
    z = (pb - pa) / math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    assert (comparison["a"], comparison["b"]) == ("notify-100", "notify-200")
    assert comparison["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert comparison["sentence"].startswith(
        f"notify-200's clicked rate {100 * pb:.2f}% vs notify-100's {100 * pa:.2f}%"
    )


@pytest.mark.slow
def test_flags_follow_the_blueprint_thresholds(monitored):
    metrics, _, _ = monitored
    for model_id, model in metrics["models"].items():
        o = model["overall"]
        overall_flags = {f["setting"] for f in model["flags"] if f["scope"] == "all days"}
        assert ("min_auc" in overall_flags) == (o["auc"] < 0.6), model_id
        assert ("max_calibration_error" in overall_flags) == (o["calibration_error"] > 0.1)


@pytest.mark.slow
def test_skew_report_flags_the_shifted_feature(monitored):
    metrics, _, _ = monitored
    skew = metrics["skew"]
    by_name = {f["name"]: f for f in skew["features"]}
    assert skew["skewed"] == ["tenure_days"]
    assert by_name["tenure_days"]["comparator"] == "Jensen-Shannon"
    assert by_name["tenure_days"]["distance"] > 0.1
    assert by_name["country"]["comparator"] == "L-infinity"
    assert by_name["country"]["distance"] < 0.1
    assert skew["serving_examples"] == 240


@pytest.mark.slow
def test_report_and_plots_are_written(monitored):
    metrics, _, out = monitored
    html = (out / "report.html").read_text()
    for name in metrics["plots"].values():
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, name
        assert f"href='{name}'" in html
    assert "— significant at 5%" in html
    assert "tenure_days" in html


def test_scores_without_decisions_are_timed_by_their_event_time(tmp_path):
    """Without --decisions each score row stands in for its decision."""
    (tmp_path / "notify.yaml").write_text(BLUEPRINT)
    rows = [
        {
            "decision_id": f"d-{i}",
            "score": s,
            "model_id": "notify-1",
            "event_time": "2026-11-01T10:00:00Z",
        }
        for i, s in enumerate([0.2, 0.9, 0.6, 0.4])
    ]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    obs = [
        {"decision_id": d, "event_time": t, "observations": {"click": 1}}
        for d, t in (
            ("d-1", "2026-11-01T10:30:00Z"),
            ("d-2", "2026-11-01T10:59:00Z"),
            ("d-0", "2026-11-01T11:30:00Z"),
        )
    ]  # d-0's click is too late
    (tmp_path / "obs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in obs))
    metrics = monitor.run(
        [
            "--scores",
            str(tmp_path / "scores.jsonl"),
            "--observations",
            str(tmp_path / "obs.jsonl"),
            "--blueprint",
            str(tmp_path / "notify.yaml"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    overall = metrics["models"]["notify-1"]["overall"]
    assert overall["count"] == 4 and overall["positives"] == 2
    # Positives 0.9, 0.6 against negatives 0.2, 0.4: every pair ordered.
    assert overall["auc"] == 1.0
    assert metrics["skew"] == {"skipped": "no --training_stats given"}


def test_bad_arguments_exit_non_zero_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.monitor", "--output", "o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "monitor: error: --observations is required"
    assert sum(line.startswith("monitor:") for line in proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--observations", "x", "--blueprint", "b", "--output", "o"], "--scores"),
        (
            [
                "--scores",
                "/nonexistent/*.jsonl",
                "--observations",
                "/nonexistent/o",
                "--blueprint",
                "examples/notify.yaml",
                "--output",
                "o",
            ],
            "matches no files",
        ),
        (
            [
                "--scores",
                "tests",
                "--observations",
                "tests/*.py",
                "--blueprint",
                "examples/notify.yaml",
                "--output",
                "o",
            ],
            "matches only directories",
        ),
        (
            [
                "--scores",
                "x",
                "--observations",
                "x",
                "--blueprint",
                "/nonexistent.yaml",
                "--output",
                "o",
            ],
            "cannot be read",
        ),
        (
            [
                "--scores",
                "tests/*.py",
                "--observations",
                "tests/*.py",
                "--blueprint",
                "examples/notify.yaml",
                "--output",
                "o",
                "--manifest",
                "tests/conftest.py",
            ],
            "--manifest: tests/conftest.py is not readable JSON",
        ),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(args, message, capsys):
    assert monitor.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monitor: error: ") and message in err[0]


def test_unknown_monitor_setting_is_refused(tmp_path):
    (tmp_path / "bp.yaml").write_text(BLUEPRINT.replace("min_count: 1", "min_aucc: 1"))
    with pytest.raises(monitor.MonitorError, match="monitor.min_aucc is not a monitor setting"):
        monitor_settings(read_blueprint(str(tmp_path / "bp.yaml")))


def test_numeric_label_gets_rmse_mae_r2_and_the_manifest_delays(tmp_path):
    """A float label (summed dwell seconds) on the scores-only path, checked by hand."""
    (tmp_path / "dwell.yaml").write_text(
        BLUEPRINT.replace(
            "name: clicked, observation: click, aggregation: max",
            "name: dwell, observation: dwell_seconds, aggregation: sum",
        )
        .replace("default: 0}", "default: 0.0}")
        .replace(
            "monitor: {min_auc: 0.6, max_calibration_error: 0.1, min_count: 1}",
            "monitor: {max_rmse: 0.9, min_count: 1}",
        )
    )
    predictions = {"d-0": 2.0, "d-1": 5.0, "d-2": 1.0}
    (tmp_path / "scores.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "decision_id": d,
                    "score": s,
                    "model_id": "dwell-1",
                    "event_time": "2026-11-01T10:00:00Z",
                }
            )
            + "\n"
            for d, s in predictions.items()
        )
    )
    observed = [
        ("d-0", "10:10", 1.5),
        ("d-0", "10:20", 1.5),
        ("d-1", "10:30", 4.0),
        ("d-2", "12:30", 9.0),
    ]  # d-2's dwell is after the window: default 0.0
    (tmp_path / "obs.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "decision_id": d,
                    "event_time": f"2026-11-01T{t}:00Z",
                    "observations": {"dwell_seconds": v},
                }
            )
            + "\n"
            for d, t, v in observed
        )
    )
    (tmp_path / "manifest.json").write_text(json.dumps({"label_delay_ms": {"p50": 600000}}))
    metrics = monitor.run(
        [
            "--scores",
            str(tmp_path / "scores.jsonl"),
            "--observations",
            str(tmp_path / "obs.jsonl"),
            "--blueprint",
            str(tmp_path / "dwell.yaml"),
            "--manifest",
            str(tmp_path / "manifest.json"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    overall = metrics["models"]["dwell-1"]["overall"]
    labels = {"d-0": 3.0, "d-1": 4.0, "d-2": 0.0}
    errors = [predictions[d] - labels[d] for d in labels]
    mean = sum(labels.values()) / 3
    sst = sum((v - mean) ** 2 for v in labels.values())
    assert overall["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3))
    assert overall["mae"] == pytest.approx(sum(abs(e) for e in errors) / 3)
    assert overall["r2"] == pytest.approx(1 - sum(e * e for e in errors) / sst)
    # Errors -1, +1, +1: RMSE 1.0 is past max_rmse 0.9.
    (flag,) = metrics["models"]["dwell-1"]["flags"][:1]
    assert (flag["setting"], flag["scope"]) == ("max_rmse", "all days")
    assert metrics["label_delay"]["manifest"] == {"label_delay_ms": {"p50": 600000}}
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def test_parse_score_row_accepts_rows_and_refuses_bad_ones():
    row = parse_score_row(
        '{"decision_id": "d1", "score": [0.25], "model_id": "m-1", '
        '"explored": true, "scored_at": "2026-11-01T00:00:00Z"}'
    )
    assert (row.decision_id, row.score, row.model_id, row.explored) == ("d1", 0.25, "m-1", True)
    assert row.time_ms == 1_793_491_200_000
    assert parse_score_row("{not json").reason == "bad_json"
    assert parse_score_row('{"decision_id": "d1", "score": "high"}').reason == "wrong_type"
    assert parse_score_row('{"decision_id": "d1", "score": 0.2, "propensity": 2}').reason == (
        "wrong_type"
    )
    # In a decision log, lines without a score (or not JSON at all) are simply not score rows.
    assert parse_score_row('{"decision_id": "d1"}', require_score=False) is None
    assert parse_score_row("{not json", require_score=False) is None


def test_attach_scores_keeps_the_latest_score_and_separates_the_rest():
    decided = DecisionEvent("d1", "notify", 1_793_491_200_000, {}, model_id="old", propensity=0.9)
    lonely = DecisionEvent("d2", "notify", 1_793_491_200_000, {})
    joined = [
        JoinedDecision(decided, 1, OBSERVED, 1, (5,), (5,)),
        JoinedDecision(lonely, 0, DEFAULT, 0, (), ()),
    ]
    scores = [
        ScoreRow("d1", 0.3, "m-1", 1, None, None, 1_000),
        ScoreRow("d1", 0.7, "m-2", 0, None, True, 2_000),
        ScoreRow("d9", 0.5, "m-1"),
    ]
    with TestPipeline() as p:
        out = (p | "Joined" >> beam.Create(joined), p | "Scores" >> beam.Create(scores)) | (
            AttachScores("3")
        )
        assert_that(
            out.outcomes,
            equal_to(
                [
                    MonitoredDecision(
                        "d1",
                        "m-2",
                        "3",
                        "2026-11-01",
                        1_793_491_200_000,
                        0.7,
                        1.0,
                        True,
                        0,
                        0.9,
                        True,
                    )
                ]
            ),
            label="Outcomes",
        )
        assert_that(
            out.unscored | beam.Map(lambda j: j.decision.decision_id),
            equal_to(["d2"]),
            label="Unscored",
        )
        assert_that(
            out.unmatched_scores | beam.Map(lambda s: s.decision_id),
            equal_to(["d9"]),
            label="Unmatched",
        )


def test_a_fallback_row_counts_for_its_arm_and_for_no_model():
    """bulk_score writes a null score for a rollout arm served by the fallback decision."""
    fallback = parse_score_row(
        '{"decision_id": "d1", "score": null, "model_id": null, "arm": "production", '
        '"decision": 0, "propensity": 1.0}'
    )
    assert (fallback.score, fallback.arm, fallback.decision) == (None, "production", 0)
    # A null score with no arm is still refused: nothing says which arm it stands for.
    assert parse_score_row('{"decision_id": "d1", "score": null, "decision": 0}').reason == (
        "wrong_type"
    )
    decided = DecisionEvent("d1", "notify", 1_793_491_200_000, {"user_id": "u1"})
    joined = [JoinedDecision(decided, 1, OBSERVED, 1, (5,), (5,))]
    with TestPipeline() as p:
        out = (
            p | "Joined" >> beam.Create(joined),
            p | "Scores" >> beam.Create([fallback]),
        ) | AttachScores("3", unit_feature="user_id")
        assert_that(out.outcomes, equal_to([]), label="NoModelMetrics")
        assert_that(
            out.unscored | beam.Map(lambda j: j.decision.decision_id),
            equal_to(["d1"]),
            label="Unscored",
        )
        assert_that(
            out.arm_outcomes | beam.Map(lambda a: (a.decision_id, a.arm, a.label, a.unit)),
            equal_to([("d1", "production", 1.0, "u1")]),
            label="Arms",
        )


def test_label_delay_histogram_counts_offsets_in_window_bins():
    bins = DelayBins.for_window(WINDOW_MS, SLACK_MS, bins=48)  # from -5 min to 2 h, 2.6 min bins
    decision = DecisionEvent("d1", "notify", 0, {})
    joined = [
        JoinedDecision(
            decision, 1, OBSERVED, 2, (-60_000, 600_000), (-60_000, 600_000, 600_000, 5 * WINDOW_MS)
        )
    ]
    with TestPipeline() as p:
        rows = p | beam.Create(joined) | LabelDelayHistogram(bins)
        assert_that(
            rows,
            equal_to(
                [
                    {"bin": bins.index(-60_000), "count": 1, "counted": 1},
                    {"bin": bins.index(600_000), "count": 2, "counted": 1},
                    {"bin": 48, "count": 1, "counted": 0},
                ]
            ),
        )


def _small_inputs(tmp_path, observations, monitor_section="{min_count: 1}"):
    """Four score rows of one model and the given observations; returns the monitor's argv."""
    (tmp_path / "notify.yaml").write_text(
        BLUEPRINT.replace(
            "monitor: {min_auc: 0.6, max_calibration_error: 0.1, min_count: 1}",
            f"monitor: {monitor_section}",
        )
    )
    rows = [
        {"decision_id": f"d-{i}", "score": s, "model_id": "notify-1", "event_time": "2026-11-01T10:00:00Z"}
        for i, s in enumerate([0.2, 0.9, 0.6, 0.4])
    ]  # fmt: skip
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "obs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in observations))
    return [
        "--scores", str(tmp_path / "scores.jsonl"),
        "--observations", str(tmp_path / "obs.jsonl"),
        "--blueprint", str(tmp_path / "notify.yaml"),
        "--output", str(tmp_path / "out"),
    ]  # fmt: skip


CLICKS = [
    {"decision_id": "d-1", "event_time": "2026-11-01T10:30:00Z", "observations": {"click": 1}},
    {"decision_id": "d-2", "event_time": "2026-11-01T10:59:00Z", "observations": {"click": 1}},
]


def test_unknown_flag_is_refused_instead_of_dropped(tmp_path, capsys):
    args = _small_inputs(tmp_path, CLICKS) + ["--alowed_lateness", "1h"]
    assert monitor.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "monitor: error: unknown argument '--alowed_lateness'; "
        "see python -m pipelines.monitor --help for the flags"
    ]
    assert not (tmp_path / "out").exists()


def test_an_abbreviated_flag_is_refused_too(tmp_path, capsys):
    args = [a if a != "--observations" else "--observ" for a in _small_inputs(tmp_path, CLICKS)]
    assert monitor.main(args) == 2
    assert "unknown argument '--observ'" in capsys.readouterr().err


def test_help_lists_the_monitors_own_flags():
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.monitor", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in ("--scores", "--observations", "--training_stats", "--fail_on_flags"):
        assert flag in proc.stdout
    assert "--runner RUNNER" not in proc.stdout  # Beam's own options are only pointed to


def test_no_usable_observation_fails_the_run_after_writing_its_outputs(tmp_path, capsys):
    orphan = [{"decision_id": "nobody", "event_time": "2026-11-01T10:30:00Z", "observations": {"click": 1}}]  # fmt: skip
    assert monitor.main(_small_inputs(tmp_path, orphan)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "monitor: error: no usable observations (1 read, none counted toward a scored "
        "decision's label)"
    ]
    assert (tmp_path / "out" / "metrics.json").exists()


def test_a_fired_monitor_flag_fails_the_run_and_names_the_flag(tmp_path, capsys):
    args = _small_inputs(tmp_path, CLICKS, "{min_count: 1, max_log_loss: 0.1}")
    assert monitor.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("monitor: error: model notify-1: log_loss ")
    assert "is above max_log_loss 0.1 (all days, n=4)" in err[0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["flagged_models"] == ["notify-1"]


def test_flags_do_not_fail_the_run_when_asked_not_to(tmp_path):
    args = _small_inputs(tmp_path, CLICKS, "{min_count: 1, max_log_loss: 0.1}")
    assert monitor.main([*args, "--fail_on_flags", "false"]) == 0


def test_a_clean_run_exits_zero(tmp_path):
    assert monitor.main(_small_inputs(tmp_path, CLICKS)) == 0


def test_arms_are_summarised_per_day_for_the_experiment(tmp_path):
    args = _small_inputs(tmp_path, CLICKS)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    for row in rows:  # d-0, d-2 production; d-1, d-3 challenger
        row["arm"] = "challenger" if int(row["decision_id"][2:]) % 2 else "production"
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = monitor.run(args)
    day = metrics["arms"]["challenger"]["2026-11-01"]
    assert (day["count"], day["label_sum"], day["label_sum_sq"]) == (2, 1.0, 1.0)  # d-1 clicked
    day = metrics["arms"]["production"]["2026-11-01"]
    assert (day["count"], day["label_sum"]) == (2, 1.0)  # d-2 clicked


def test_a_score_row_with_an_empty_arm_is_refused():
    row = parse_score_row(json.dumps({"decision_id": "d", "score": 0.5, "arm": ""}))
    assert row.reason == "wrong_type" and "arm" in row.detail


ROLLOUT_BLUEPRINT = """
name: notify
version: 3
features:
  - {name: user_id, type: string}
  - {name: open_rate, type: float}
label: {name: clicked, observation: click, aggregation: max, window: 1h,
        backward_slack: 2m, default: 0}
monitor: {min_count: 1}
rollout: {unit: user_id, challenger_share: 0.5, salt: s1, min_exposure: 200, max_days: 14}
"""


def rollout_fixture(
    root,
    challenger_rate,
    production_rate=0.1,
    days=3,
    users=400,
    seed=5,
    fallback=False,
    blueprint=ROLLOUT_BLUEPRINT,
    more=(),
):
    """Each user decides once a day in their hashed arm; clicks follow the arm's true rate.

    With ``fallback`` the production arm is the blueprint's fallback (no model, no score) and
    the arms are logged in the decision events themselves, as the decision client logs them.
    ``more`` holds further observations as ``(key, {arm: rate}, delay)``: each decision gets
    ``{key: 1}`` that long after it with its arm's rate."""
    from loopline.blueprint import parse_blueprint
    from loopline.experiment import assign_arm

    (root / "notify.yaml").write_text(blueprint)
    rollout = parse_blueprint(blueprint).rollout
    rng = random.Random(seed)
    decisions, scores, observations = [], [], []
    for day in range(days):
        for u in range(users):
            user, i = f"u-{u}", f"d-{day}-{u}"
            arm = assign_arm(user, rollout)
            decided = START + timedelta(days=day, seconds=60 * u)
            rate = challenger_rate if arm == "challenger" else production_rate
            decisions.append(
                {"decision_id": i, "decision_type": "notify", "event_time": _iso(decided),
                 "features": {"user_id": user, "open_rate": rng.random()}}
            )  # fmt: skip
            served = {"score": rng.random(), "arm": arm,
                      "model_id": "notify-new" if arm == "challenger" else "notify-old"}  # fmt: skip
            if not fallback:
                scores.append({"decision_id": i, **served})
            elif arm == "challenger":
                decisions[-1].update(served)
            else:
                decisions[-1]["arm"] = arm
            drawn = [("click", rate, timedelta(minutes=5))]
            drawn += [(key, rates[arm], delay) for key, rates, delay in more]
            for key, p, delay in drawn:
                if rng.random() < p:
                    observations.append(
                        {"decision_id": i, "event_time": _iso(decided + delay),
                         "observations": {key: 1}}
                    )  # fmt: skip
    for name, rows in (("decisions", decisions), ("scores", scores), ("obs", observations)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        *(["--scores", str(root / "scores.jsonl")] if scores else []),
        "--decisions", str(root / "decisions.jsonl"),
        "--observations", str(root / "obs.jsonl"), "--blueprint", str(root / "notify.yaml"),
        "--output", str(root / "out"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def better_challenger(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    metrics = monitor.run(rollout_fixture(root, challenger_rate=0.3))
    return metrics, root / "out"


@pytest.mark.slow
def test_a_truly_better_challenger_gets_the_verdict_challenger_better(better_challenger):
    metrics, out = better_challenger
    experiment = metrics["experiment"]
    assert experiment["verdict"] == "challenger_better"
    assert experiment["challenger"] == ["notify-new"] and experiment["production"] == ["notify-old"]
    assert experiment["days"] == ["2026-11-01", "2026-11-02", "2026-11-03"]


@pytest.mark.slow
def test_the_experiment_counts_units_not_decisions(better_challenger):
    metrics, _ = better_challenger
    units = metrics["experiment"]["units"]
    assert units["production"] + units["challenger"] == 400  # users, though 1200 decisions


@pytest.mark.slow
def test_the_verdict_file_names_the_models_and_the_sentence(better_challenger):
    _, out = better_challenger
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "challenger_better"
    assert (verdict["challenger"], verdict["production"]) == ("notify-new", "notify-old")
    assert verdict["flags"] == [] and "clicked" in verdict["summary"]


@pytest.mark.slow
def test_promote_accepts_the_monitors_verdict_file(better_challenger, tmp_path):
    """The file is written for pipelines.promote: it moves the aliases on it as it stands."""
    from loopline import registry
    from pipelines import promote
    from tests.test_monitor_guardrails import serving_dir

    _, out = better_challenger
    serving = serving_dir(tmp_path)
    assert (
        promote.main(["--serving_dir", str(serving), "--verdict", str(out / "verdict.json")]) == 0
    )
    assert registry.read_aliases(str(serving)).production == "notify-new"


@pytest.mark.slow
def test_a_fallback_production_arm_is_compared_though_it_gives_no_score(tmp_path):
    metrics = monitor.run(rollout_fixture(tmp_path, challenger_rate=0.3, fallback=True))
    experiment = metrics["experiment"]
    assert experiment["verdict"] == "challenger_better"
    assert experiment["production"] == ["unknown"] and experiment["challenger"] == ["notify-new"]
    assert experiment["units"]["production"] + experiment["units"]["challenger"] == 400
    verdict = json.loads((tmp_path / "out" / "verdict.json").read_text())
    assert verdict["production"] is None and verdict["challenger"] == "notify-new"


def test_equal_arms_are_inconclusive(tmp_path):
    metrics = monitor.run(rollout_fixture(tmp_path, challenger_rate=0.1, days=1))
    assert metrics["experiment"]["verdict"] == "inconclusive"


def test_without_arms_the_experiment_is_skipped(tmp_path):
    metrics = monitor.run(_small_inputs(tmp_path, CLICKS))
    assert metrics["experiment"] == {
        "skipped": "no scored decision carries an arm (no rollout in this input)"
    }
    assert not (tmp_path / "out" / "verdict.json").exists()


@pytest.mark.slow
def test_the_report_states_the_rollout_verdict_in_words(better_challenger):
    _, out = better_challenger
    html = (out / "report.html").read_text()
    assert "Rollout experiment (production vs challenger)" in html
    assert "challenger_better" in html and "notify-new" in html


def test_bad_bytes_in_any_input_do_not_stop_the_monitor(tmp_path):
    args = _small_inputs(tmp_path, CLICKS)
    for name in ("obs.jsonl", "scores.jsonl"):
        with open(tmp_path / name, "ab") as f:
            f.write(b'{"decision_id": "d-9", "caf\xe9": 1}\n\xef\xbb\xbf' + b"[" * 5000 + b"\n")
    metrics = monitor.run(args)
    assert metrics["models"]["notify-1"]["overall"]["count"] == 4
    assert metrics["inputs"]["parse.observations_rejected"] == 2
