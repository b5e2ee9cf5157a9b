"""The monitoring report: PNG plots and one self-contained HTML page from ``metrics.json``.

Everything here reads the metrics dict the monitor writes (see ``pipelines.monitor``), so a
report can be rebuilt from a saved ``metrics.json`` without rerunning any pipeline.

    >>> files = write_report(json.load(open("out/metrics.json")), "out")
    >>> files.html
    'out/report.html'
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402

CALIBRATION_PNG = "calibration.png"
SCORES_PNG = "score_distribution.png"
DELAY_PNG = "label_delay.png"
DAILY_PNG = "metrics_per_day.png"
REPORT_HTML = "report.html"
_DPI = 110


@dataclass
class ReportFiles:
    """Paths of what ``write_report`` wrote; ``plots`` maps a plot name to its PNG path."""

    html: str
    plots: dict = field(default_factory=dict)


def _models(metrics: dict) -> dict:
    return metrics.get("models", {})


def plot_calibration(metrics: dict, path: Path) -> bool:
    """Observed label rate against mean score per bin, one line per model, with the diagonal."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    drawn = False
    for model_id, model in sorted(_models(metrics).items()):
        table = model["overall"].get("calibration") or []
        points = [(b["mean_score"], b["label_rate"], b["count"]) for b in table if b["count"]]
        if not points:
            continue
        xs, ys, ns = zip(*points, strict=True)
        ece = model["overall"].get("calibration_error")
        name = f"{model_id} (ECE {ece:.3f})" if ece is not None else model_id
        ax.plot(xs, ys, marker="o", label=name)
        drawn = True
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="mean predicted score",
        ylabel="observed label rate",
        title="Calibration (10 score bins)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    return drawn


def plot_score_distribution(metrics: dict, path: Path) -> bool:
    """Histogram of scores per model (share of the model's decisions per bin)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for model_id, model in sorted(_models(metrics).items()):
        hist = model["overall"].get("score_histogram") or {}
        edges, counts = hist.get("edges") or [], hist.get("counts") or []
        total = sum(counts)
        if not total:
            continue
        shares = [c / total for c in counts]
        ax.stairs(shares, edges, label=f"{model_id} (n={total})", linewidth=1.8)
        drawn = True
    ax.set(xlabel="score", ylabel="share of decisions", title="Score distribution by model")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    _save(fig, path)
    return drawn


def plot_label_delay(metrics: dict, path: Path) -> bool:
    """Observation offsets from their decision, with the label window marked."""
    delay = metrics.get("label_delay") or {}
    edges = delay.get("edges_ms") or []
    counts = delay.get("counts") or []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    minutes = [e / 60_000 for e in edges]
    if counts and sum(counts):
        ax.stairs(counts, minutes, fill=True, alpha=0.6, label="observations")
    window = delay.get("window_ms", 0) / 60_000
    slack = delay.get("backward_slack_ms", 0) / 60_000
    ax.axvspan(-slack, window, color="tab:green", alpha=0.12, label="label window")
    ax.axvline(window, color="tab:green", linestyle="--")
    if slack:
        ax.axvline(-slack, color="tab:green", linestyle=":")
    below, above = delay.get("below", 0), delay.get("above", 0)
    note = f"outside the plot: {below} earlier, {above} later"
    ax.set(
        xlabel="minutes from decision to observation",
        ylabel="observations",
        title=f"Label delay ({note})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return bool(counts and sum(counts))


def plot_metrics_per_day(metrics: dict, path: Path) -> bool:
    """The headline metric (AUC, or RMSE for a numeric label) and label rate vs mean score,
    per UTC day, one line per model."""
    numeric = (metrics.get("label") or {}).get("type") == "float"
    headline = "rmse" if numeric else "auc"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    days = sorted({d for m in _models(metrics).values() for d in m.get("days", {})})
    drawn = False
    for i, (model_id, model) in enumerate(sorted(_models(metrics).items())):
        color = f"C{i % 10}"
        per_day = model.get("days", {})
        xs = [days.index(d) for d in sorted(per_day)]
        values = [per_day[d].get(headline) for d in sorted(per_day)]
        top.plot(xs, [_nan(v) for v in values], marker="o", color=color, label=model_id)
        rates = [_nan(per_day[d].get("label_rate")) for d in sorted(per_day)]
        means = [_nan(per_day[d].get("mean_score")) for d in sorted(per_day)]
        bottom.plot(xs, rates, marker="o", color=color, label=f"{model_id} observed")
        bottom.plot(
            xs, means, marker="x", linestyle="--", color=color, label=f"{model_id} predicted"
        )
        drawn = drawn or bool(xs)
    threshold = (metrics.get("thresholds") or {}).get("max_rmse" if numeric else "min_auc")
    if threshold is not None:
        top.axhline(threshold, color="red", linestyle=":", label=f"threshold {threshold}")
    top.set(ylabel=headline.upper(), title=f"{headline.upper()} per day")
    bottom.set(ylabel="label", title="Observed label vs mean predicted score per day")
    bottom.set_xticks(range(len(days)), days, rotation=30, ha="right")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    _save(fig, path)
    return drawn


PLOTS = {
    "calibration": (CALIBRATION_PNG, plot_calibration),
    "score_distribution": (SCORES_PNG, plot_score_distribution),
    "label_delay": (DELAY_PNG, plot_label_delay),
    "metrics_per_day": (DAILY_PNG, plot_metrics_per_day),
}


def write_plots(metrics: dict, output_dir: str | Path) -> dict[str, str]:
    """Writes every plot of ``PLOTS`` as a PNG; returns ``{name: path}``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (filename, plot) in PLOTS.items():
        plot(metrics, out / filename)
        written[name] = str(out / filename)
    return written


def write_report(metrics: dict, output_dir: str | Path) -> ReportFiles:
    """Writes the plots and ``report.html`` (PNG files embedded as data URIs and linked)."""
    out = Path(output_dir)
    plots = write_plots(metrics, out)
    page = render_html(metrics, plots)
    path = out / REPORT_HTML
    path.write_text(page, encoding="utf-8")
    return ReportFiles(str(path), plots)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.flag{color:#b00020;font-weight:600}.ok{color:#1b7f3a;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}
.plots img{max-width:520px;border:1px solid #eee}.muted{color:#777}
"""


def render_html(metrics: dict, plots: dict[str, str]) -> str:
    """The report page for ``metrics`` with the PNGs at ``plots`` embedded."""
    bp = metrics.get("blueprint") or {}
    label = metrics.get("label") or {}
    numeric = label.get("type") == "float"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Loopline monitor — {_e(bp.get('name', ''))}</title><style>{_CSS}</style>",
        "</head><body>",
        f"<h1>Loopline monitor: {_e(bp.get('name', '?'))} v{_e(bp.get('version', '?'))}</h1>",
        f"<p class='muted'>Label <b>{_e(label.get('name', '?'))}</b> ({_e(label.get('type', '?'))}),"
        f" window {_e(label.get('window', ''))}, backward slack "
        f"{_e(label.get('backward_slack', ''))}. Generated {_e(metrics.get('generated_at', ''))}."
        "</p>",
        _summary_section(metrics, numeric),
        _flags_section(metrics),
        _experiment_section(metrics),
        _observable_section(metrics, numeric),
        _policy_values_section(metrics),
        _ab_section(metrics),
        "<h2>Pictures</h2><div class='plots'>",
    ]
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        filename = Path(path).name
        parts.append(
            f"<figure><a href='{_e(filename)}'><img alt='{_e(name)}' "
            f"src='data:image/png;base64,{data}'></a><figcaption>{_e(filename)}</figcaption>"
            "</figure>"
        )
    parts.append("</div>")
    parts.append(_daily_section(metrics, numeric))
    parts.append(_calibration_section(metrics))
    parts.append(_skew_section(metrics))
    parts.append(_inputs_section(metrics))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_section(metrics: dict, numeric: bool) -> str:
    cols = (
        ["count", "label_rate", "mean_score", "rmse", "mae", "r2"]
        if numeric
        else [
            "count",
            "positives",
            "label_rate",
            "mean_score",
            "auc",
            "log_loss",
            "calibration_error",
        ]
    )
    cols += ["observed_share", "decision_rate", "exploration_share"]
    rows = []
    for model_id, model in sorted(_models(metrics).items()):
        status = (
            "<span class='flag'>flagged</span>"
            if model.get("flags")
            else "<span class='ok'>ok</span>"
        )
        cells = "".join(f"<td>{_fmt(model['overall'].get(c))}</td>" for c in cols)
        rows.append(f"<tr><td class='l'>{_e(model_id)}</td><td class='l'>{status}</td>{cells}</tr>")
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    explain = _e(metrics.get("exploration_rule", ""))
    return (
        "<h2>Per model (all days)</h2><table><tr><th class='l'>model_id</th>"
        f"<th class='l'>status</th>{head}</tr>{''.join(rows)}</table>"
        f"<p class='muted'>Exploration share: {explain}</p>"
    )


def _flags_section(metrics: dict) -> str:
    items = []
    for model_id, model in sorted(_models(metrics).items()):
        for flag in model.get("flags", []):
            items.append(f"<li class='flag'>{_e(model_id)}: {_e(flag['message'])}</li>")
    if not items:
        return "<h2>Flags</h2><p class='ok'>No model is past a blueprint threshold.</p>"
    return f"<h2>Flags</h2><ul>{''.join(items)}</ul>"


def _experiment_section(metrics: dict) -> str:
    """The rollout's verdict in words, then its figures (arms compared within days)."""
    experiment = metrics.get("experiment") or {}
    if "verdict" not in experiment:
        return ""
    verdict = experiment["verdict"]
    css = "ok" if verdict == "challenger_better" else "flag" if verdict != "inconclusive" else ""
    parts = [
        "<h2>Rollout experiment (production vs challenger)</h2>",
        f"<p class='{css}'>{_e(verdict)}</p><p>{_e(experiment['sentence'])}</p>",
        "<table><tr><th class='l'>arm</th><th class='l'>models</th><th>units</th></tr>",
    ]
    for arm in ("production", "challenger"):
        parts.append(
            f"<tr><td class='l'>{arm}</td><td class='l'>{_e(', '.join(experiment[arm]))}</td>"
            f"<td>{experiment['units'].get(arm, 0)}</td></tr>"
        )
    primary = (experiment.get("figures") or {}).get("primary")
    parts.append("</table>")
    if primary:
        lo, hi = primary["ci"]
        parts.append(
            f"<p class='muted'>{_e(primary['name'])}: production {_fmt(primary['production_mean'])}, "
            f"challenger {_fmt(primary['challenger_mean'])}, difference "
            f"{_fmt(primary['difference'])} (always-valid {1 - primary['alpha']:.0%} interval "
            f"[{_fmt(lo)}, {_fmt(hi)}], p = {_fmt(primary['p_value'])}) over "
            f"{primary['days']} day(s), compared within each day.</p>"
        )
    parts.append(_guardrails_table(experiment.get("guardrails") or []))
    return "".join(parts)


def _guardrails_table(guardrails: list[dict]) -> str:
    """One row per blueprint guardrail: what it measures, both arms' means, the difference with
    its always-valid interval, and whether it fired."""
    if not guardrails:
        return "<p class='muted'>No guardrail is declared in the blueprint's rollout section.</p>"
    head = (
        "<h3>Guardrails</h3><table><tr><th class='l'>guardrail</th><th class='l'>measures</th>"
        "<th>production</th><th>challenger</th><th>difference</th><th>interval</th>"
        "<th>p</th><th class='l'>fired</th></tr>"
    )
    rows = []
    for g in guardrails:
        f = g.get("figures")
        status = "<span class='flag'>fired</span>" if g["fired"] else "<span class='ok'>no</span>"
        if f is None:
            cells = "<td colspan='5'>no day yet on which both arms served</td>"
        else:
            cells = (
                f"<td>{_fmt(f['production_mean'])}</td><td>{_fmt(f['challenger_mean'])}</td>"
                f"<td>{_fmt(f['difference'])}</td>"
                f"<td>[{_fmt(f['ci'][0])}, {_fmt(f['ci'][1])}]</td><td>{_fmt(f['p_value'])}</td>"
            )
        rows.append(
            f"<tr><td class='l'>{_e(g['name'])}</td><td class='l'>{_e(g['measures'])}</td>"
            f"{cells}<td class='l'>{status}</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def _observable_section(metrics: dict, numeric: bool) -> str:
    """Per model: its metrics on every row next to those on rows whose label was observable."""
    when = (metrics.get("label") or {}).get("observable_when") or {}
    if not when:
        return ""
    cols = ["count", "label_rate", "mean_score"] + (
        ["rmse", "mae"] if numeric else ["auc", "calibration_error"]
    )
    rows = []
    for model_id, model in sorted(_models(metrics).items()):
        for scope, figures in (
            ("all rows", model.get("overall")),
            ("observable", model.get("observable")),
        ):
            cells = "".join(f"<td>{_fmt((figures or {}).get(c))}</td>" for c in cols)
            rows.append(
                f"<tr><td class='l'>{_e(model_id)}</td><td class='l'>{scope}</td>{cells}</tr>"
            )
    rule = ", ".join(f"{k} in {v}" for k, v in when.items())
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    return (
        "<h2>Observable rows</h2>"
        f"<p class='muted'>The label is observable only when {_e(rule)}; elsewhere it is the "
        "default whatever the model said, which flatters AUC and calibration on all rows.</p>"
        f"<table><tr><th class='l'>model_id</th><th class='l'>rows</th>{head}</tr>"
        f"{''.join(rows)}</table>"
    )


def _policy_values_section(metrics: dict) -> str:
    """Each arm's policy value and its greedy policy's, estimated off-policy (SNIPS, DR)."""
    section = metrics.get("policy_values") or {}
    rows = section.get("rows") or []
    if not rows:
        return ""
    out = [
        "<h2>Policy values (off-policy)</h2>",
        f"<p class='muted'>Value: {_e(section['reward'])}. <i>logged</i>: the policy that served "
        "the arm, exploration included; <i>greedy</i>: "
        f"{_e(section.get('greedy_rule') or 'not defined for this policy')}, estimated from the "
        "exploration in the log. 95% intervals.</p>",
        "<table><tr><th class='l'>arm</th><th class='l'>model_id</th><th class='l'>policy</th>"
        "<th>rows</th><th>SNIPS</th><th>SNIPS 95% CI</th><th>DR</th><th>DR 95% CI</th></tr>",
    ]
    for row in rows:
        cells = ""
        for name in ("snips", "dr"):
            e = row.get(name)
            cells += (
                "<td>–</td><td>–</td>"
                if e is None
                else f"<td>{_fmt(e['value'])}</td><td>[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]</td>"
            )
        out.append(
            f"<tr><td class='l'>{_e(row['arm'] or '–')}</td><td class='l'>{_e(row['model_id'])}</td>"
            f"<td class='l'>{_e(row['policy'])}</td><td>{_fmt(row['rows'])}</td>{cells}</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _ab_section(metrics: dict) -> str:
    ab = metrics.get("ab") or {}
    parts = ["<h2>A/B between versions</h2>"]
    any_comparison = False
    for dimension, title in (
        ("models", "model versions"),
        ("blueprint_versions", "blueprint versions"),
    ):
        comparisons = ab.get(dimension) or []
        if not comparisons:
            continue
        any_comparison = True
        parts.append(f"<h3>Between {title}</h3><ul>")
        for c in comparisons:
            parts.append(f"<li>{_e(c['sentence'])}</li>")
        parts.append(
            "</ul><table><tr><th class='l'>group</th><th>n</th><th>rate</th><th>95% CI</th></tr>"
        )
        seen = set()
        for c in comparisons:
            for side in ("a", "b"):
                name = c[side]
                if name in seen:
                    continue
                seen.add(name)
                lo, hi = c[f"interval_{side}"]
                parts.append(
                    f"<tr><td class='l'>{_e(name)}</td><td>{c[f'n_{side}']}</td>"
                    f"<td>{_fmt(c[f'rate_{side}'])}</td><td>[{_fmt(lo)}, {_fmt(hi)}]</td></tr>"
                )
        parts.append("</table>")
    if not any_comparison:
        parts.append("<p class='muted'>One version served in this period: nothing to compare.</p>")
    elif ab.get("note"):
        parts.append(f"<p class='muted'>{_e(ab['note'])}</p>")
    return "".join(parts)


def _daily_section(metrics: dict, numeric: bool) -> str:
    cols = ["count", "label_rate", "mean_score"] + (
        ["rmse", "mae", "r2"] if numeric else ["auc", "log_loss", "calibration_error"]
    )
    cols += ["decision_rate", "exploration_share"]
    rows = []
    for model_id, model in sorted(_models(metrics).items()):
        for day, m in sorted(model.get("days", {}).items()):
            cells = "".join(f"<td>{_fmt(m.get(c))}</td>" for c in cols)
            rows.append(
                f"<tr><td class='l'>{_e(model_id)}</td><td class='l'>{day}</td>{cells}</tr>"
            )
    head = "".join(f"<th>{c}</th>" for c in cols)
    return (
        f"<h2>Per model and day (UTC)</h2><table><tr><th class='l'>model_id</th>"
        f"<th class='l'>day</th>{head}</tr>{''.join(rows)}</table>"
    )


def _calibration_section(metrics: dict) -> str:
    if (metrics.get("label") or {}).get("type") == "float":
        return ""
    parts = ["<h2>Calibration tables</h2>"]
    for model_id, model in sorted(_models(metrics).items()):
        parts.append(
            f"<h3>{_e(model_id)}</h3><table><tr><th>bin</th><th>n</th>"
            "<th>mean score</th><th>observed rate</th></tr>"
        )
        for b in model["overall"].get("calibration") or []:
            parts.append(
                f"<tr><td>[{b['lower']:.1f}, {b['upper']:.1f})</td><td>{b['count']}</td>"
                f"<td>{_fmt(b['mean_score'])}</td><td>{_fmt(b['label_rate'])}</td></tr>"
            )
        parts.append("</table>")
    return "".join(parts)


def _skew_section(metrics: dict) -> str:
    skew = metrics.get("skew") or {}
    parts = ["<h2>Training/serving skew</h2>"]
    if skew.get("skipped"):
        parts.append(f"<p class='muted'>Not computed: {_e(skew['skipped'])}</p>")
        return "".join(parts)
    parts.append(
        f"<p>Serving features from {skew.get('serving_examples', '?')} decisions compared "
        f"with the training statistics at <code>{_e(skew.get('training_stats', '?'))}</code>.</p>"
        "<table><tr><th class='l'>feature</th><th class='l'>comparator</th><th>distance</th>"
        "<th>threshold</th><th class='l'>status</th><th class='l'>anomalies</th></tr>"
    )
    for f in skew.get("features", []):
        status = (
            "<span class='flag'>skewed</span>" if f.get("skewed") else "<span class='ok'>ok</span>"
        )
        anomalies = "; ".join(f.get("anomalies", []))
        parts.append(
            f"<tr><td class='l'>{_e(f['name'])}</td><td class='l'>{_e(f.get('comparator') or '-')}"
            f"</td><td>{_fmt(f.get('distance'))}</td><td>{_fmt(f.get('threshold'))}</td>"
            f"<td class='l'>{status}</td><td class='l'>{_e(anomalies)}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def _inputs_section(metrics: dict) -> str:
    counts = metrics.get("inputs") or {}
    rows = "".join(
        f"<tr><td class='l'>{_e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in sorted(counts.items())
    )
    return f"<h2>Inputs and accounting</h2><table>{rows}</table>"


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4f}"
    return _e(str(value))


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
