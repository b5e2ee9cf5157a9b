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
