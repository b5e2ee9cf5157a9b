"""Live model monitoring: scored decisions joined with what happened after them.

    python -m pipelines.monitor --scores 'scores/*.jsonl' --decisions 'logs/decisions-*.jsonl' \\
        --observations 'logs/observations-*.jsonl' --blueprint examples/notify.yaml \\
        --output monitor/ [--training_stats PIPELINE_ROOT/StatisticsGen/...] [--schema schema.pbtxt] \\
        [--manifest span/manifest.json] [beam options]

The Beam pipeline labels decisions with the same ``JoinDecisions`` transform and blueprint
window as training, attaches each decision's score by ``decision_id``, and combines per model
and UTC day (heavy work, on the runner). The launcher then assembles ``metrics.json`` (flags
against the blueprint's ``monitor:`` thresholds, A/B tests between versions, skew against the
training statistics), the PNG plots and ``report.html`` under ``--output``.

Decision time. With ``--decisions`` (the decision events that were scored, with their
features) a decision's time and features come from its event. Without it, each score row stands
in for its decision, timed by its ``event_time`` or else its ``scored_at``; a bulk scoring run
stamps ``scored_at`` with the wall clock, so pass ``--decisions`` whenever observations are
timed relative to the original decision.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.blueprint import Blueprint, BlueprintError, format_duration
from loopline.metrics import two_proportion_test
from loopline.report import write_report
from pipelines.blueprint_io import read_blueprint
from pipelines.options import PII_KEY_SECRET_HELP, add_shared_argument
from transforms.events import ParseDecisions, ParseObservations
from transforms.join import JoinDecisions
from transforms.monitoring import (
    ALL_DAYS,
    BLUEPRINT,
    DEFAULT_MAX_SKEW_JENSEN_SHANNON,
    DEFAULT_MAX_SKEW_LINF,
    MODEL,
    AttachScores,
    DelayBins,
    LabelDelayHistogram,
    ParseScores,
    ServingStatistics,
    SummariseOutcomes,
    decision_from_score,
    load_statistics,
    skew_report,
)

METRICS_JSON = "metrics.json"
SERVING_STATS = "serving_stats.pb"
_PARTS = "_parts"

# Blueprint ``monitor:`` thresholds: key -> (metric, "min" | "max").
THRESHOLDS = {
    "min_auc": ("auc", "min"),
    "max_log_loss": ("log_loss", "max"),
    "max_calibration_error": ("calibration_error", "max"),
    "max_rmse": ("rmse", "max"),
    "max_mae": ("mae", "max"),
    "min_r2": ("r2", "min"),
}
# Other ``monitor:`` settings and their defaults.
SETTINGS = {
    "min_count": 30,  # a model/day with fewer labelled decisions is reported but not judged
    "ab_alpha": 0.05,
    "max_skew_jensen_shannon": DEFAULT_MAX_SKEW_JENSEN_SHANNON,
    "max_skew_linf": DEFAULT_MAX_SKEW_LINF,
}
EXPLORATION_RULE = (
    "the score row's explored flag when it has one, else propensity < 0.5 on the chosen arm"
)


class MonitorError(ValueError):
    """A monitor run that cannot start: one sentence saying what to fix."""


class MonitorOptions(PipelineOptions):
    """The monitor's parameters (the Flex Template's too)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--scores", help="Glob of score rows (JSON lines) from bulk scoring.")
        add_shared_argument(
            parser,
            "--decisions",
            help="Glob of decision events (JSON lines) that were scored; a 'score' field in "
            "them is used too. Gives decision times and features (for skew).",
        )
        add_shared_argument(
            parser, "--observations", help="Glob of observation events (JSON lines)."
        )
        add_shared_argument(
            parser, "--blueprint", help="The blueprint YAML the model was trained with."
        )
        add_shared_argument(
            parser, "--output", help="Directory for metrics.json, PNGs and report.html."
        )
        parser.add_argument(
            "--training_stats",
            help="TFDV statistics of the training data (StatisticsGen's FeatureStats.pb, or "
            "its output directory) for the skew report; needs --decisions.",
        )
        parser.add_argument("--schema", help="Schema (schema.pbtxt) for the skew report.")
        parser.add_argument("--manifest", help="manifest.json of the join span, for its delays.")
        add_shared_argument(parser, "--pii_key_secret", help=PII_KEY_SECRET_HELP)


def monitor_settings(blueprint: Blueprint) -> tuple[dict, dict]:
    """(thresholds, settings) from the blueprint's ``monitor:`` section; unknown keys fail."""
    thresholds, settings = {}, dict(SETTINGS)
    for key, value in (blueprint.monitor or {}).items():
        if key not in THRESHOLDS and key not in SETTINGS:
            known = ", ".join(sorted([*THRESHOLDS, *SETTINGS]))
            raise MonitorError(
                f"{blueprint.source}: monitor.{key} is not a monitor setting (known: {known})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MonitorError(f"{blueprint.source}: monitor.{key} must be a number, got {value!r}")
        (thresholds if key in THRESHOLDS else settings)[key] = value
    return thresholds, settings


def _require_matches(flag: str, pattern: str) -> None:
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - any filesystem error is a bad argument here
        raise MonitorError(f"{flag} {pattern!r} cannot be read ({e})") from None
    if not matched:
        raise MonitorError(f"{flag} {pattern!r} matches no files")
    if all(os.path.isdir(m.path) for m in matched):
        raise MonitorError(
            f"{flag} {pattern!r} matches only directories; add the file pattern, e.g. DIR/*.jsonl"
        )


def validate(opts: MonitorOptions) -> Blueprint:
    """Fails fast, with one sentence, on anything that would make the run pointless."""
    for flag in ("observations", "blueprint", "output"):
        if not getattr(opts, flag):
            raise MonitorError(f"--{flag} is required")
    if not opts.scores and not opts.decisions:
        raise MonitorError("give --scores (score rows) and/or --decisions (decision events)")
    try:
        blueprint = read_blueprint(opts.blueprint)
    except BlueprintError as e:
        raise MonitorError(str(e)) from None
    monitor_settings(blueprint)
    for flag in ("scores", "decisions", "observations"):
        if getattr(opts, flag):
            _require_matches(f"--{flag}", getattr(opts, flag))
    for flag in ("training_stats", "schema", "manifest"):
        path = getattr(opts, flag)
        if path and not FileSystems.exists(path):
            raise MonitorError(f"--{flag} {path!r} does not exist")
    if opts.training_stats and not opts.decisions:
        raise MonitorError(
            "--training_stats needs --decisions: the skew report compares the "
            "features of the scored decisions with the training statistics"
        )
    if opts.schema and not opts.training_stats:
        raise MonitorError("--schema is only used with --training_stats")
    return blueprint


def build_pipeline(
    p: beam.Pipeline, opts: MonitorOptions, blueprint: Blueprint, parts: str, key: bytes | None
) -> None:
    """The Beam graph: parse, join with the blueprint window, attach scores, summarise."""
    observations = (
        p
        | "ReadObservations" >> beam.io.ReadFromText(opts.observations)
        | "ParseObservations" >> ParseObservations(blueprint)
    )
    score_sets = []
    if opts.scores:
        parsed = (
            p | "ReadScores" >> beam.io.ReadFromText(opts.scores) | "ParseScores" >> ParseScores()
        )
        score_sets.append(parsed.scores)
    if opts.decisions:
        decision_lines = p | "ReadDecisions" >> beam.io.ReadFromText(opts.decisions)
        decisions = (decision_lines | "ParseDecisions" >> ParseDecisions(blueprint)).events
        score_sets.append(
            (decision_lines | "ParseDecisionScores" >> ParseScores(require_score=False)).scores
        )
    scores = tuple(score_sets) | "FlattenScores" >> beam.Flatten()
    if not opts.decisions:
        name = blueprint.name
        decisions = scores | "DecisionsFromScores" >> beam.Map(
            lambda row: TimestampedValue(
                decision_from_score(row, name), Timestamp(micros=(row.time_ms or 0) * 1000)
            )
        )
    join = (decisions, observations.events) | "JoinDecisions" >> JoinDecisions(blueprint)
    monitored = (join.joined, scores) | "AttachScores" >> AttachScores(blueprint.version)
    (
        monitored.outcomes
        | "SummariseOutcomes" >> SummariseOutcomes(blueprint.label.type)
        | "SummariesToJson" >> beam.Map(json.dumps)
        | "WriteSummaries" >> beam.io.WriteToText(f"{parts}/summaries", ".jsonl")
    )
    bins = DelayBins.for_window(blueprint.label.window_ms, blueprint.label.backward_slack_ms)
    (
        join.joined
        | "LabelDelayHistogram" >> LabelDelayHistogram(bins)
        | "DelaysToJson" >> beam.Map(json.dumps)
        | "WriteDelays" >> beam.io.WriteToText(f"{parts}/label_delay", ".jsonl")
    )
    if opts.training_stats:
        _ = join.joined | "ServingStatistics" >> ServingStatistics(
            blueprint, key, f"{parts}/{SERVING_STATS}"
        )


def _read_json_lines(pattern: str) -> list[dict]:
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows.extend(
                json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()
            )
    return rows


def _counters(result) -> dict:
    """Every ``loopline.*`` counter of the run, summed over steps."""
    counts: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if not namespace.startswith("loopline."):
            continue
        name = f"{namespace.removeprefix('loopline.')}.{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def flag_model(model_id: str, model: dict, thresholds: dict, min_count: int) -> list[dict]:
    """Every threshold a model's metrics fall past, over all days and per day.

    A group with fewer than ``min_count`` labelled decisions is not judged.
    """
    flags = []
    groups = [("all days", model["overall"])] + sorted(model["days"].items())
    for scope, metrics in groups:
        if metrics["count"] < min_count:
            continue
        for key, threshold in thresholds.items():
            metric, rule = THRESHOLDS[key]
            value = metrics.get(metric)
            if value is None:
                continue
            if (value < threshold) if rule == "min" else (value > threshold):
                word = "below" if rule == "min" else "above"
                flags.append(
                    {
                        "metric": metric,
                        "value": value,
                        "threshold": threshold,
                        "setting": key,
                        "scope": scope,
                        "count": metrics["count"],
                        "message": f"{metric} {value:.4f} is {word} {key} {threshold} "
                        f"({scope}, n={metrics['count']})",
                    }
                )
    return flags


def _version_order(name: str) -> tuple:
    # Pusher versions are integer timestamps: compare "notify-9" < "notify-10" numerically.
    tail = name.rsplit("-", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def ab_comparisons(groups: dict[str, dict], label_name: str, alpha: float) -> list[dict]:
    """Consecutive versions (in version order) compared by their observed label rate."""
    names = sorted(groups, key=_version_order)
    out = []
    for a, b in zip(names, names[1:], strict=False):
        ga, gb = groups[a], groups[b]
        out.append(
            two_proportion_test(
                int(ga["positives"]),
                ga["count"],
                int(gb["positives"]),
                gb["count"],
                a,
                b,
                alpha=alpha,
                metric=f"{label_name} rate",
            ).to_dict()
        )
    return out


def label_delay_section(rows: list[dict], blueprint: Blueprint, manifest: dict | None) -> dict:
    """The histogram rows of ``LabelDelayHistogram`` as edges/counts, with the window."""
    bins = DelayBins.for_window(blueprint.label.window_ms, blueprint.label.backward_slack_ms)
    counts = [0] * bins.bins
    counted = [0] * bins.bins
    below = above = total_counted = 0
    for row in rows:
        if row["bin"] < 0:
            below += row["count"]
        elif row["bin"] >= bins.bins:
            above += row["count"]
        else:
            counts[row["bin"]] += row["count"]
            counted[row["bin"]] += row["counted"]
        total_counted += row["counted"]
    total = below + above + sum(counts)
    section = {
        "edges_ms": bins.edges(),
        "counts": counts,
        "counted": counted,
        "below": below,
        "above": above,
        "observations": total,
        "counted_observations": total_counted,
        "within_window_share": total_counted / total if total else None,
        "window_ms": blueprint.label.window_ms,
        "backward_slack_ms": blueprint.label.backward_slack_ms,
    }
    if manifest is not None:
        section["manifest"] = {k: v for k, v in manifest.items() if "delay" in k}
    return section


def assemble_metrics(
    blueprint: Blueprint,
    summaries: list[dict],
    delays: list[dict],
    counters: dict,
    manifest: dict | None = None,
) -> dict:
    """metrics.json from the pipeline's outputs (everything but the skew section)."""
    thresholds, settings = monitor_settings(blueprint)
    label = blueprint.label
    models: dict[str, dict] = {}
    versions: dict[str, dict] = {}
    for row in summaries:
        dimension, group, day = row.pop("dimension"), row.pop("group"), row.pop("day")
        if dimension == MODEL:
            model = models.setdefault(group, {"overall": None, "days": {}})
            if day == ALL_DAYS:
                model["overall"] = row
            else:
                model["days"][day] = row
        elif dimension == BLUEPRINT:
            versions[group] = row
    for model_id, model in models.items():
        model["flags"] = flag_model(model_id, model, thresholds, settings["min_count"])
        model["status"] = "flagged" if model["flags"] else "ok"
    ab: dict = {"models": [], "blueprint_versions": []}
    if label.type == "int":
        alpha = settings["ab_alpha"]
        ab["models"] = ab_comparisons(
            {m: v["overall"] for m, v in models.items()}, label.name, alpha
        )
        ab["blueprint_versions"] = ab_comparisons(versions, label.name, alpha)
        ab["note"] = (
            "The test compares observed label rates and assumes the versions served "
            "comparable traffic (a random split); versions that served different days "
            "also differ by day."
        )
    else:
        ab["note"] = "A/B tests compare binary label rates; this blueprint's label is numeric."
    return {
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "blueprint": blueprint.summary(),
        "label": {
            "name": label.name,
            "type": label.type,
            "window_ms": label.window_ms,
            "window": format_duration(label.window_ms),
            "backward_slack_ms": label.backward_slack_ms,
            "backward_slack": format_duration(label.backward_slack_ms),
        },
        "thresholds": thresholds,
        "settings": settings,
        "exploration_rule": EXPLORATION_RULE,
        "inputs": counters,
        "models": models,
        "blueprint_versions": versions,
        "flagged_models": sorted(m for m, v in models.items() if v["flags"]),
        "ab": ab,
        "label_delay": label_delay_section(delays, blueprint, manifest),
    }


def _skew_section(
    opts: MonitorOptions, blueprint: Blueprint, parts: str, settings: dict, counters: dict
) -> dict:
    if not opts.training_stats:
        return {"skipped": "no --training_stats given"}
    import tensorflow_data_validation as tfdv

    serving = load_statistics(f"{parts}/{SERVING_STATS}")
    training = load_statistics(opts.training_stats)
    schema = tfdv.load_schema_text(opts.schema) if opts.schema else None
    report = skew_report(
        blueprint,
        training,
        serving,
        schema,
        settings["max_skew_jensen_shannon"],
        settings["max_skew_linf"],
    )
    report["training_stats"] = opts.training_stats
    report["serving_examples"] = int(serving.datasets[0].num_examples) if serving.datasets else 0
    return report


def _write_outputs(metrics: dict, output: str) -> str:
    """metrics.json, the PNGs and report.html under ``output`` (local or a Beam filesystem)."""
    local = not FileSystems.get_scheme(output) or FileSystems.get_scheme(output) == "file"
    target = Path(output) if local else Path(tempfile.mkdtemp(prefix="loopline-monitor-"))
    target.mkdir(parents=True, exist_ok=True)
    files = write_report(metrics, target)
    metrics["plots"] = {name: Path(path).name for name, path in files.plots.items()}
    (target / METRICS_JSON).write_text(json.dumps(metrics, indent=2, sort_keys=True), "utf-8")
    if not local:
        for path in target.iterdir():
            with FileSystems.create(FileSystems.join(output, path.name)) as f:
                f.write(path.read_bytes())
        shutil.rmtree(target)
    return FileSystems.join(output, "report.html")


def run(argv: list[str] | None = None) -> dict:
    """Runs the monitor; returns the metrics dict also written to ``--output/metrics.json``.

    Raises MonitorError (one sentence) on bad arguments, before any pipeline starts.
    """
    options = PipelineOptions(argv)
    opts = options.view_as(MonitorOptions)
    blueprint = validate(opts)
    _, settings = monitor_settings(blueprint)
    key = None
    # The key only hashes the scored decisions' features for the skew report.
    from transforms.examples import PiiKeyMissing, check_pii_key_secret, pii_key

    try:
        if opts.training_stats:
            key = pii_key(blueprint, opts.pii_key_secret)
        elif opts.pii_key_secret:
            check_pii_key_secret(opts.pii_key_secret)
    except PiiKeyMissing as e:
        raise MonitorError(str(e)) from None
    manifest = None
    if opts.manifest:
        with FileSystems.open(opts.manifest) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    parts = FileSystems.join(opts.output, _PARTS)
    if FileSystems.exists(parts):
        FileSystems.delete([parts])  # a rerun must not read the last run's parts

    p = beam.Pipeline(options=options)
    build_pipeline(p, opts, blueprint, parts, key)
    result = p.run()
    result.wait_until_finish()

    counters = _counters(result)
    summaries = _read_json_lines(f"{parts}/summaries*.jsonl")
    delays = _read_json_lines(f"{parts}/label_delay*.jsonl")
    metrics = assemble_metrics(blueprint, summaries, delays, counters, manifest)
    metrics["skew"] = _skew_section(opts, blueprint, parts, settings, counters)
    metrics["report"] = _write_outputs(metrics, opts.output)
    FileSystems.delete([parts])
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.WARNING)
    try:
        metrics = run(argv if argv is not None else sys.argv[1:])
    except MonitorError as e:
        print(f"monitor: {e}", file=sys.stderr)
        return 2
    for model_id, model in sorted(metrics["models"].items()):
        o = model["overall"]
        headline = (
            f"AUC {o['auc']:.4f}"
            if o.get("auc") is not None
            else f"RMSE {o['rmse']:.4f}"
            if o.get("rmse") is not None
            else ""
        )
        print(
            f"{model_id}: n={o['count']} label rate {o['label_rate']:.4f} vs mean score "
            f"{o['mean_score']:.4f} {headline} [{model['status']}]"
        )
    for comparison in metrics["ab"].get("models", []):
        print(comparison["sentence"])
    for name in (metrics.get("skew") or {}).get("skewed", []):
        print(f"skew: feature {name} is past its threshold")
    print(f"report: {metrics['report']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
