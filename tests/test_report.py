"""loopline.report: real PNGs and an HTML page from a metrics dict built with loopline.metrics."""

import html as html_lib
import random
from pathlib import Path

from loopline.metrics import summarise, two_proportion_test
from loopline.report import PLOTS, render_html, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics() -> dict:
    rng = random.Random(1)
    models = {}
    for model_id, lift in (("notify-1", 0.0), ("notify-2", 0.1)):
        days = {}
        rows_all = []
        for day in ("2026-11-01", "2026-11-02", "2026-11-03"):
            rows = []
            for _ in range(200):
                s = rng.random()
                rows.append(
                    {
                        "score": s,
                        "label": int(rng.random() < 0.7 * s + lift),
                        "decision": int(s > 0.5),
                        "propensity": 0.975,
                    }
                )
            rows_all += rows
            summary = summarise(rows)
            days[day] = {**summary.binary_metrics(), "score_histogram": summary.score_histogram()}
        summary = summarise(rows_all)
        overall = {**summary.binary_metrics(), "score_histogram": summary.score_histogram()}
        flags = [] if overall["auc"] > 0.6 else [{"message": "auc below min_auc"}]
        models[model_id] = {"overall": overall, "days": days, "flags": flags}
    a, b = models["notify-1"]["overall"], models["notify-2"]["overall"]
    comparison = two_proportion_test(
        a["positives"],
        a["count"],
        b["positives"],
        b["count"],
        "notify-1",
        "notify-2",
        metric="clicked rate",
    )
    return {
        "blueprint": {"name": "notify", "version": "1"},
        "label": {"name": "clicked", "type": "int", "window": "1h", "backward_slack": "2m"},
        "thresholds": {"min_auc": 0.6},
        "models": models,
        "ab": {"models": [comparison.to_dict()], "blueprint_versions": []},
        "label_delay": {
            "edges_ms": [i * 300_000 for i in range(-1, 25)],
            "counts": [rng.randrange(50) for _ in range(25)],
            "window_ms": 3_600_000,
            "backward_slack_ms": 120_000,
            "below": 0,
            "above": 3,
        },
        "skew": {"skipped": "no --training_stats given"},
        "inputs": {"join.decisions_in": 1200},
    }


def test_report_writes_every_plot_and_embeds_it(tmp_path):
    metrics = _metrics()
    files = write_report(metrics, tmp_path)
    assert set(files.plots) == set(PLOTS)
    html = (tmp_path / "report.html").read_text()
    for path in files.plots.values():
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000, path
        name = path.rsplit("/", 1)[-1]
        assert f"href='{name}'" in html
    assert html.count("src='data:image/png;base64,") == len(PLOTS)


def test_report_states_the_ab_result_and_the_numbers(tmp_path):
    metrics = _metrics()
    html = render_html(metrics, {})
    sentence = metrics["ab"]["models"][0]["sentence"]
    assert sentence.startswith("notify-2's clicked rate")
    assert html_lib.escape(sentence) in html
    assert f"{metrics['models']['notify-1']['overall']['auc']:.4f}" in html
    assert "Not computed: no --training_stats given" in html


def test_report_handles_a_numeric_label_and_no_data(tmp_path):
    metrics = {
        "label": {"name": "dwell", "type": "float"},
        "models": {},
        "ab": {},
        "label_delay": {},
        "skew": {"skipped": "none"},
    }
    files = write_report(metrics, tmp_path)
    for path in files.plots.values():
        assert Path(path).read_bytes()[:8] == PNG_MAGIC
    assert "nothing to compare" in (tmp_path / "report.html").read_text()


def test_report_shows_observable_rows_next_to_all_rows():
    metrics = _metrics()
    metrics["label"]["observable_when"] = {"decision": [1]}
    for model in metrics["models"].values():
        model["observable"] = {**model["overall"], "count": 123, "auc": 0.6543}
    html = render_html(metrics, {})
    assert "<h2>Observable rows</h2>" in html and "decision in [1]" in html
    assert "<td>123</td>" in html and "0.6543" in html


def test_report_without_observable_when_has_no_observable_table():
    assert "Observable rows" not in render_html(_metrics(), {})


def test_report_lists_each_arms_policy_values_with_their_intervals():
    metrics = _metrics()
    estimate = {"value": 0.0924, "ci_low": 0.0852, "ci_high": 0.0995, "se": 0.0036}
    metrics["policy_values"] = {
        "reward": "clicked per decision",
        "greedy_rule": "decision 1 when the arm's score >= 0.1",
        "rows": [
            {"arm": "production", "model_id": "notify-1", "policy": "logged", "rows": 6280,
             "snips": estimate, "dr": None},
        ],
    }  # fmt: skip
    html = render_html(metrics, {})
    assert "<h2>Policy values (off-policy)</h2>" in html
    assert "<td>0.0924</td><td>[0.0852, 0.0995]</td><td>–</td><td>–</td>" in html
    assert "score &gt;= 0.1" in html


def test_report_shows_each_guardrail_and_whether_it_fired():
    metrics = _metrics()
    figures = {"production_mean": 0.0153, "challenger_mean": 0.1498, "difference": 0.1345,
               "ci": [0.0786, 0.1905], "p_value": 6.3e-09}  # fmt: skip
    metrics["experiment"] = {
        "verdict": "challenger_worse",
        "sentence": "The challenger made guardrail unsubscribed worse.",
        "production": ["notify-1"],
        "challenger": ["notify-2"],
        "units": {"production": 200, "challenger": 200},
        "figures": {},
        "guardrails": [
            {"name": "unsubscribed", "measures": "unsubscribe per decision", "fired": True,
             "figures": figures},
            {"name": "reading_time", "measures": "dwell_seconds per decision", "fired": False,
             "figures": None},
        ],
    }  # fmt: skip
    html = render_html(metrics, {})
    assert "<h3>Guardrails</h3>" in html
    assert "<td>0.1498</td><td>0.1345</td><td>[0.0786, 0.1905]</td>" in html
    assert html.count("fired</span>") == 1
    assert "no day yet on which both arms served" in html
