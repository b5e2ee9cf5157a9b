"""Live model monitoring: scored decisions joined with what happened after them.

    python -m pipelines.monitor --scores 'scores/*.jsonl' --decisions 'logs/decisions-*.jsonl' \\
        --observations 'logs/observations-*.jsonl' --blueprint examples/notify.yaml \\
        --output monitor/ [--training_stats PIPELINE_ROOT/StatisticsGen/...] [--schema schema.pbtxt] \\
        [--manifest span/manifest.json] [beam options]

Decisions and observations are read like the join reads them (``transforms.sources.ReadEvents``:
JSON lines as bytes, Avro by extension, or a BigQuery table with ``--decisions_table`` /
``--observations_table``). The Beam pipeline labels decisions with the same ``JoinDecisions`` transform and blueprint
window as training, attaches each decision's score by ``decision_id``, and combines per model
and UTC day (heavy work, on the runner). ``loopline.readout`` then assembles ``metrics.json``
(flags against the blueprint's ``monitor:`` thresholds, A/B tests between versions), the skew
section compares serving features with the training statistics, and ``loopline.report`` draws
the PNG plots and ``report.html`` under ``--output``.

Decision time. With ``--decisions`` (the decision events that were scored, with their
features) a decision's time and features come from its event. Without it, each score row stands
in for its decision, timed by its ``event_time`` or else its ``scored_at``; a bulk scoring run
stamps ``scored_at`` with the wall clock, so pass ``--decisions`` whenever observations are
timed relative to the original decision.

Exit status: 2 with ``monitor: error: <line>`` on bad arguments or inputs; 1, after every output
is written, when the run has no usable observations or a blueprint monitor flag fires (a model
past a ``monitor:`` threshold, a feature skewed past its limit) unless ``--fail_on_flags false``;
0 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import apache_beam as beam
from apache_beam import coders
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from loopline import storage
from loopline.blueprint import Blueprint, BlueprintError, Guardrail
from loopline.events import DECISION, OBSERVATION
from loopline.readout import (
    MonitorError,
    assemble_metrics,
    experiment_section,
    greedy_threshold,
    monitor_settings,
    policy_values_section,
)
from loopline.report import write_report
from pipelines.blueprint_io import read_blueprint
from pipelines.launch import FailedRun, boolean_flag, counter_summary, parse_options
from pipelines.launch import main as launch_main
from pipelines.options import PII_KEY_SECRET_HELP, add_shared_argument
from transforms.events import ParseDecisions, ParseObservations
from transforms.join import JoinDecisions
from transforms.monitoring import (
    UNKNOWN_MODEL,
    AttachScores,
    CountUnitsPerArm,
    DelayBins,
    EstimatePolicyValues,
    LabelDelayHistogram,
    SummariseArms,
    SummariseOutcomes,
)
from transforms.score_rows import (
    ParseScores,
    timestamped_decision_from_score,
)
from transforms.skew import (
    ServingStatistics,
    load_statistics,
    skew_report,
)
from transforms.sources import ReadEvents

PROG = "monitor"
METRICS_JSON = "metrics.json"
VERDICT_JSON = "verdict.json"
SERVING_STATS = "serving_stats.pb"
_PARTS = "_parts"

__all__ = ["MonitorError", "MonitorOptions", "MonitorConfig", "resolve", "build", "run", "main"]


class MonitorOptions(PipelineOptions):
    """Monitors a live model: scored decisions joined with their outcomes, per model and day."""

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
        add_shared_argument(parser, "--decisions_table", help="BigQuery table of decision events")
        add_shared_argument(
            parser, "--observations_table", help="BigQuery table of observation events"
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
        parser.add_argument(
            "--fail_on_flags",
            type=boolean_flag,
            default=True,
            help="Exit 1 (after writing every output) when a monitor flag fires or no "
            "observation is usable (default true; the daily DAG's task then fails).",
        )
        add_shared_argument(parser, "--pii_key_secret", help=PII_KEY_SECRET_HELP)


@dataclass(frozen=True)
class MonitorConfig:
    """Everything a monitor run needs, checked: what ``resolve`` returns."""

    blueprint: Blueprint
    observations: ReadEvents
    output: str
    scores: str | None
    decisions: ReadEvents | None
    training_stats: str | None
    schema: str | None
    manifest: dict | None
    key: bytes | None  # hashes the scored decisions' features for the skew report
    fail_on_flags: bool

    @property
    def parts(self) -> str:
        """Where the pipeline writes its rows before the readout is assembled."""
        return FileSystems.join(self.output, _PARTS)


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


def _source(opts: MonitorOptions, kind: str) -> ReadEvents | None:
    """Where events of ``kind`` are read: a file glob or a BigQuery table, not both."""
    pattern, table = getattr(opts, f"{kind}s"), getattr(opts, f"{kind}s_table")
    if pattern and table:
        raise MonitorError(f"give --{kind}s or --{kind}s_table, not both")
    if pattern:
        _require_matches(f"--{kind}s", pattern)
    if not (pattern or table):
        return None
    return ReadEvents(kind, pattern=pattern, table=table)


def _checked(opts: MonitorOptions) -> Blueprint:
    if not opts.observations and not opts.observations_table:
        raise MonitorError("--observations is required")
    for flag in ("blueprint", "output"):
        if not getattr(opts, flag):
            raise MonitorError(f"--{flag} is required")
    if not opts.scores and not (opts.decisions or opts.decisions_table):
        raise MonitorError("give --scores (score rows) and/or --decisions (decision events)")
    try:
        blueprint = read_blueprint(opts.blueprint)
    except BlueprintError as e:
        raise MonitorError(str(e)) from None
    monitor_settings(blueprint)
    if opts.scores:
        _require_matches("--scores", opts.scores)
    for flag in ("training_stats", "schema", "manifest"):
        path = getattr(opts, flag)
        # --training_stats is StatisticsGen's output directory: on GCS a prefix, not an object.
        if path and not (
            storage.exists(path) or (flag == "training_stats" and storage.is_dir(path))
        ):
            raise MonitorError(f"--{flag} {path!r} does not exist")
    if opts.training_stats and not (opts.decisions or opts.decisions_table):
        raise MonitorError(
            "--training_stats needs --decisions: the skew report compares the "
            "features of the scored decisions with the training statistics"
        )
    if opts.schema and not opts.training_stats:
        raise MonitorError("--schema is only used with --training_stats")
    return blueprint


def _key(opts: MonitorOptions, blueprint: Blueprint) -> bytes | None:
    from loopline.examples import PiiKeyMissing, check_pii_key_secret, pii_key

    try:
        if opts.training_stats:
            return pii_key(blueprint, opts.pii_key_secret)
        if opts.pii_key_secret:
            check_pii_key_secret(opts.pii_key_secret)
    except PiiKeyMissing as e:
        raise MonitorError(str(e)) from None
    return None


def resolve(opts: MonitorOptions) -> MonitorConfig:
    """Checks every argument, file and secret; raises MonitorError (one sentence) before any
    pipeline starts."""
    blueprint = _checked(opts)
    try:
        manifest = storage.read_json(opts.manifest) if opts.manifest else None
    except storage.StorageError as e:
        raise MonitorError(f"--manifest: {e}") from None
    return MonitorConfig(
        blueprint=blueprint,
        observations=_source(opts, OBSERVATION),
        output=opts.output,
        scores=opts.scores,
        decisions=_source(opts, DECISION),
        training_stats=opts.training_stats,
        schema=opts.schema,
        manifest=manifest,
        key=_key(opts, blueprint),
        fail_on_flags=opts.fail_on_flags,
    )


def build(p: beam.Pipeline, config: MonitorConfig) -> None:
    """The Beam graph: parse, join with the blueprint window, attach scores, summarise."""
    blueprint, parts = config.blueprint, config.parts
    observation_source = config.observations
    observations = (
        p
        | "ReadObservations" >> observation_source
        | "ParseObservations"
        >> ParseObservations(blueprint, format=observation_source.parse_format)
    )
    score_sets = []
    if config.scores:
        parsed = (
            p
            | "ReadScores" >> beam.io.ReadFromText(config.scores, coder=coders.BytesCoder())
            | "ParseScores" >> ParseScores()
        )
        score_sets.append(parsed.scores)
    if config.decisions:
        decision_source = config.decisions
        raw_decisions = p | "ReadDecisions" >> decision_source
        decisions = (
            raw_decisions
            | "ParseDecisions" >> ParseDecisions(blueprint, format=decision_source.parse_format)
        ).events
        score_sets.append(
            (raw_decisions | "ParseDecisionScores" >> ParseScores(require_score=False)).scores
        )
    scores = tuple(score_sets) | "FlattenScores" >> beam.Flatten()
    if not config.decisions:
        decisions = scores | "DecisionsFromScores" >> beam.Map(
            timestamped_decision_from_score, blueprint.name
        )
    join = (decisions, observations.events) | "JoinDecisions" >> JoinDecisions(blueprint)
    unit = blueprint.rollout.unit if blueprint.rollout else None
    monitored = (join.joined, scores) | "AttachScores" >> AttachScores(
        blueprint.version, unit, label_spec=blueprint.label
    )
    (
        monitored.outcomes
        | "SummariseOutcomes" >> SummariseOutcomes(blueprint.label.type)
        | "SummariesToJson" >> beam.Map(json.dumps)
        | "WriteSummaries" >> beam.io.WriteToText(f"{parts}/summaries", ".jsonl")
    )
    arm_sets = [monitored.arm_outcomes | "SummariseArms" >> SummariseArms()]
    for guardrail in blueprint.rollout.guardrails if blueprint.rollout else ():
        arm_sets.append(
            _guardrail_arms(decisions, observations.events, scores, blueprint, guardrail)
        )
    for name, rows in (
        ("arms", tuple(arm_sets) | "FlattenArms" >> beam.Flatten()),
        ("units", monitored.arm_outcomes | "CountUnitsPerArm" >> CountUnitsPerArm()),
        (
            "policy_values",
            monitored.outcomes
            | "EstimatePolicyValues"
            >> EstimatePolicyValues(blueprint.label, greedy_threshold(blueprint)),
        ),
    ):
        _ = (
            rows
            | f"ToJson[{name}]" >> beam.Map(json.dumps)
            | f"Write[{name}]" >> beam.io.WriteToText(f"{parts}/{name}", ".jsonl")
        )
    bins = DelayBins.for_window(blueprint.label.window_ms, blueprint.label.backward_slack_ms)
    (
        join.joined
        | "LabelDelayHistogram" >> LabelDelayHistogram(bins)
        | "DelaysToJson" >> beam.Map(json.dumps)
        | "WriteDelays" >> beam.io.WriteToText(f"{parts}/label_delay", ".jsonl")
    )
    if config.training_stats:
        _ = join.joined | "ServingStatistics" >> ServingStatistics(
            blueprint, config.key, f"{parts}/{SERVING_STATS}"
        )


def guardrail_blueprint(blueprint: Blueprint, guardrail: Guardrail) -> Blueprint:
    """The blueprint with the guardrail in place of the label: the join then computes its
    per-decision value with the label's window and rules, 0 when no observation carries it."""
    label = replace(
        blueprint.label,
        name=guardrail.name,
        observation=guardrail.observation,
        aggregation=guardrail.aggregation,
        default=0,
        type="float",
    )
    return replace(blueprint, label=label)


def _guardrail_arms(decisions, observations, scores, blueprint, guardrail):
    """A guardrail's per-arm per-day moments (rows tagged with its name): the decisions joined
    once more with the guardrail as the label, so it means what the label means per decision."""
    name = guardrail.name
    join = (decisions, observations) | f"JoinGuardrail[{name}]" >> JoinDecisions(
        guardrail_blueprint(blueprint, guardrail)
    )
    monitored = (join.joined, scores) | f"AttachScores[{name}]" >> AttachScores(
        blueprint.version, blueprint.rollout.unit
    )
    return monitored.arm_outcomes | f"SummariseArms[{name}]" >> SummariseArms(metric=name)


def _read_json_lines(pattern: str) -> list[dict]:
    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            rows.extend(
                json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()
            )
    return rows


def _skew_section(config: MonitorConfig, settings: dict) -> dict:
    if not config.training_stats:
        return {"skipped": "no --training_stats given"}
    import tensorflow_data_validation as tfdv

    serving = load_statistics(f"{config.parts}/{SERVING_STATS}")
    training = load_statistics(config.training_stats)
    schema = tfdv.load_schema_text(config.schema) if config.schema else None
    report = skew_report(
        config.blueprint,
        training,
        serving,
        schema,
        settings["max_skew_jensen_shannon"],
        settings["max_skew_linf"],
    )
    report["training_stats"] = config.training_stats
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


def verdict_file(metrics: dict) -> dict:
    """What ``pipelines.promote`` acts on (its docstring has the schema): the experiment's
    verdict about the one challenger model, the production model it was compared with (null:
    the blueprint's fallback decided), the monitor's problems and the guardrails that fired as
    flags (a fired flag rolls the challenger back), each guardrail's figures, the sentence as
    the history's summary. Several models in one arm make the
    experiment invalid: its arms would not be one policy each."""
    experiment = metrics["experiment"]
    challengers = experiment["challenger"]
    productions = [m for m in experiment["production"] if m != UNKNOWN_MODEL]
    verdict, summary = experiment["verdict"], experiment["sentence"]
    guardrails = experiment.get("guardrails", [])
    fired = [
        f"guardrail {g['name']} worse for the challenger ({g['measures']})"
        for g in guardrails
        if g["fired"]
    ]
    if len(challengers) != 1 or len(productions) > 1:
        verdict = "invalid: several models served one arm"
        summary = (
            f"production: {', '.join(experiment['production']) or 'none'}; "
            f"challenger: {', '.join(challengers) or 'none'}"
        )
    return {
        "verdict": verdict,
        "challenger": challengers[0] if challengers else None,
        "production": productions[0] if productions else None,
        "flags": [*metrics["problems"], *fired],
        "summary": summary,
        "at": metrics["generated_at"],
        "days": experiment["days"],
        "guardrails": [
            {"name": g["name"], "measures": g["measures"], "fired": g["fired"], **_figures(g)}
            for g in guardrails
        ],
    }


def _figures(guardrail: dict) -> dict:
    figures = guardrail["figures"]
    if figures is None:
        return {"figures": "no day yet on which both arms served"}
    keys = ("production_mean", "challenger_mean", "difference", "ci", "p_value", "alpha", "days")
    return {k: figures[k] for k in keys}


def _write_verdict(metrics: dict, output: str) -> None:
    with FileSystems.create(FileSystems.join(output, VERDICT_JSON)) as f:
        f.write(json.dumps(verdict_file(metrics), indent=2, sort_keys=True).encode("utf-8"))


def problems(metrics: dict) -> list[str]:
    """Why a finished run must not pass: no usable observations, or monitor flags that fired."""
    found = []
    inputs = metrics.get("inputs", {})
    if not inputs.get("join.observations_used"):
        read = inputs.get("join.observations_in", 0)
        found.append(
            f"no usable observations ({read} read, none counted toward a scored decision's label)"
        )
    for model_id in metrics.get("flagged_models", []):
        messages = "; ".join(f["message"] for f in metrics["models"][model_id]["flags"])
        found.append(f"model {model_id}: {messages}")
    skewed = (metrics.get("skew") or {}).get("skewed", [])
    if skewed:
        found.append(f"skew past the blueprint's limits in {', '.join(skewed)}")
    return found


def run(argv: list[str] | None = None) -> dict:
    """Runs the monitor; returns the metrics dict also written to ``--output/metrics.json``.

    Raises MonitorError (one sentence) on bad arguments, before any pipeline starts.
    """
    options, opts = parse_options(argv, MonitorOptions, PROG)
    config = resolve(opts)
    _, settings = monitor_settings(config.blueprint)
    if FileSystems.exists(config.parts):
        FileSystems.delete([config.parts])  # a rerun must not read the last run's parts

    p = beam.Pipeline(options=options)
    build(p, config)
    result = p.run()
    result.wait_until_finish()

    summaries = _read_json_lines(f"{config.parts}/summaries*.jsonl")
    delays = _read_json_lines(f"{config.parts}/label_delay*.jsonl")
    metrics = assemble_metrics(
        config.blueprint, summaries, delays, counter_summary(result), config.manifest
    )
    metrics["skew"] = _skew_section(config, settings)
    metrics["experiment"] = experiment_section(
        config.blueprint,
        _read_json_lines(f"{config.parts}/arms*.jsonl"),
        _read_json_lines(f"{config.parts}/units*.jsonl"),
    )
    metrics["policy_values"] = policy_values_section(
        config.blueprint, _read_json_lines(f"{config.parts}/policy_values*.jsonl")
    )
    metrics["problems"] = problems(metrics)
    metrics["fail_on_flags"] = config.fail_on_flags
    metrics["report"] = _write_outputs(metrics, config.output)
    if "verdict" in metrics["experiment"]:
        _write_verdict(metrics, config.output)
    FileSystems.delete([config.parts])
    return metrics


def print_summary(metrics: dict) -> None:
    """One line per model, the A/B and rollout sentences, each guardrail and policy value, and
    skewed features; then fails the run (status 1) when ``metrics["problems"]`` is not empty
    and the run was asked to fail on flags."""
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
    if "verdict" in metrics["experiment"]:
        print(f"rollout: {metrics['experiment']['verdict']}: {metrics['experiment']['sentence']}")
        for g in metrics["experiment"]["guardrails"]:
            f = g["figures"]
            figures = (
                "no day yet on which both arms served"
                if f is None
                else f"production {f['production_mean']:.4g}, challenger {f['challenger_mean']:.4g}"
                f" (difference {f['difference']:+.4g}, interval {f['ci'][0]:+.4g} to "
                f"{f['ci'][1]:+.4g})"
            )
            print(f"guardrail {g['name']}: {figures}{' FIRED' if g['fired'] else ''}")
    for row in metrics.get("policy_values", {}).get("rows", []):
        estimates = "; ".join(
            f"{name.upper()} {e['value']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"
            for name in ("snips", "dr")
            if (e := row[name]) is not None
        )
        print(f"policy value {row['arm'] or '-'}/{row['model_id']} {row['policy']}: {estimates}")
    for name in (metrics.get("skew") or {}).get("skewed", []):
        print(f"skew: feature {name} is past its threshold")
    print(f"report: {metrics['report']}")
    if metrics["problems"] and metrics["fail_on_flags"]:
        raise FailedRun("; ".join(metrics["problems"]))


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.WARNING)
    return launch_main(run, PROG, argv, report=print_summary)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
