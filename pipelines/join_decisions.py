"""Joins logged decisions with their delayed observations into a span of TFRecords.

    python -m pipelines.join_decisions --decisions 'LOGS/decisions-*.jsonl' \\
        --observations 'LOGS/observations-*.jsonl' --blueprint examples/notify.yaml --output OUT
    python -m pipelines.join_decisions --decisions_table p:logs.decisions \\
        --observations_table p:logs.observations --blueprint ... --output gs://... --runner DataflowRunner
    python -m pipelines.join_decisions --streaming --decisions_subscription projects/p/subscriptions/d \\
        --observations_subscription projects/p/subscriptions/o --blueprint ... --output gs://...

Reads -> ParseDecisions / ParseObservations -> JoinDecisions -> WriteSpan (DESIGN.md, "Join
outputs"). From Pub/Sub (two subscriptions make it a streaming job, ``--streaming`` or not),
``transforms.streaming.assign_event_time`` first stamps each message with its ``event_time``
attribute; see docs/streaming.md. The blueprint is read here, on the launcher, and handed to the transforms parsed;
so is the pseudonymisation key. Options -> ``resolve(options) -> JoinConfig`` (every check of
arguments, input files and the key's secret, raising ``UsageError``) -> ``build(pipeline,
config)``; bad arguments stop the launch with one line and exit status 2 (``pipelines.launch``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.pubsub import parse_subscription
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from loopline.blueprint import Blueprint, BlueprintError, parse_duration
from loopline.events import DECISION, OBSERVATION, parse_event_time
from loopline.examples import PiiKeyMissing, pii_key
from loopline.privacy import PayloadPrivacy
from loopline.vocabulary import FILE_FORMATS, Format
from pipelines.blueprint_io import read_blueprint
from pipelines.launch import UsageError, counter_summary, parse_options
from pipelines.launch import main as launch_main
from pipelines.options import PII_KEY_SECRET_HELP, add_shared_argument
from transforms.events import ParseDecisions, ParseObservations, WriteQuarantine
from transforms.join import ALL_TIME, JoinDecisions, ObservationRange
from transforms.manifest import COUNT_NAMES, MANIFEST
from transforms.sources import NoFilesMatched, ReadEvents, detect_format, require_files
from transforms.span import SpanInputs, WriteSpan
from transforms.span_commit import SpanClaimLost, write_json_atomically
from transforms.streaming import assign_event_time

PROG = "join_decisions"


class JoinDecisionsOptions(PipelineOptions):
    """The join's parameters; every standard Beam option (``--runner``, ...) works alongside."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        add_shared_argument(
            parser, "--decisions", help="file glob of decision events (JSON lines or Avro)"
        )
        add_shared_argument(parser, "--observations", help="file glob of observation events")
        add_shared_argument(parser, "--decisions_table", help="BigQuery table of decision events")
        add_shared_argument(
            parser, "--observations_table", help="BigQuery table of observation events"
        )
        parser.add_argument(
            "--decisions_subscription",
            help="Pub/Sub subscription of decision events (projects/P/subscriptions/S); streaming",
        )
        parser.add_argument(
            "--observations_subscription", help="Pub/Sub subscription of observation events"
        )
        parser.add_argument(
            "--format",
            default="auto",
            help="file format: auto (by extension: .avro is Avro, else JSON lines), json or avro",
        )
        add_shared_argument(parser, "--blueprint", help="blueprint YAML file (local or gs://)")
        add_shared_argument(parser, "--pii_key_secret", help=PII_KEY_SECRET_HELP)
        add_shared_argument(
            parser, "--output", help="span directory the examples and manifest go to"
        )
        parser.add_argument(
            "--allowed_lateness",
            default="0s",
            help="how long past the label window a decision stays open for late data (e.g. 10m)",
        )
        parser.add_argument(
            "--num_shards",
            default=None,
            help="files per split of examples; default: chosen by the runner for the data size",
        )
        parser.add_argument(
            "--quarantine",
            default=None,
            help="batch: directory for the raw payloads of refused events; give it its own "
            "access control (default: none, and rejected/ holds redacted payloads only)",
        )
        parser.add_argument(
            "--observations_from",
            default=None,
            help="batch: start (inclusive) of the span's own observations' event times, an "
            "RFC 3339 instant with a zone (e.g. 2026-11-01T00:00:00Z); an observation with no "
            "decision in the job from before it is counted out of range, not as an orphan",
        )
        parser.add_argument(
            "--observations_until",
            default=None,
            help="batch: end (exclusive) of the span's own observations' event times, e.g. "
            "2026-11-02T00:00:00Z; observations of the job's decisions count toward their "
            "labels whatever their time (read the next day's logs too for the label window)",
        )
        parser.add_argument(
            "--output_window",
            default="1h",
            help="streaming: event-time window of each batch of output files and its manifest",
        )


@dataclass(frozen=True)
class JoinConfig:
    """Validated, launcher-side settings: what ``build`` makes the pipeline from (``resolve``)."""

    streaming: bool
    blueprint: Blueprint
    key: bytes | None  # the pseudonymisation key; None when the blueprint pseudonymises nothing
    output: str
    quarantine: str | None
    privacy: PayloadPrivacy  # how refused payloads are redacted
    allowed_lateness_ms: int
    output_window_ms: int
    num_shards: int | None
    observation_range: ObservationRange
    decisions: ReadEvents
    observations: ReadEvents


def resolve(options: JoinDecisionsOptions, streaming: bool) -> JoinConfig:
    """Every check of the join's arguments, its secret, then its input files; raises
    ``UsageError`` with one line at the first that fails. Nothing has run yet."""
    blueprint = _load_blueprint(options.blueprint)
    try:
        key = pii_key(blueprint, options.pii_key_secret)
    except PiiKeyMissing as e:
        raise UsageError(str(e)) from None
    output = _required(options.output, "--output")
    quarantine = options.quarantine or None
    if quarantine and streaming:
        raise UsageError("--quarantine is for batch jobs; a streaming job keeps no raw payloads")
    allowed_lateness_ms = _duration(options.allowed_lateness, "--allowed_lateness")
    num_shards = _num_shards(options.num_shards)
    output_window_ms = _duration(options.output_window, "--output_window")
    if output_window_ms <= 0:
        raise UsageError("--output_window must be longer than zero")
    observation_range = _observation_range(options.observations_from, options.observations_until)
    if streaming and observation_range != ALL_TIME:
        raise UsageError(
            "--observations_from and --observations_until are for batch jobs; a streaming "
            "job writes one span per --output_window"
        )
    if options.format not in FILE_FORMATS:
        raise UsageError(
            f"--format must be one of {', '.join(FILE_FORMATS)}, got {options.format!r}"
        )
    decisions, observations = (
        _source(
            kind,
            getattr(options, f"{kind}s"),
            getattr(options, f"{kind}s_table"),
            getattr(options, f"{kind}s_subscription"),
            options.format,
        )
        for kind in (DECISION, OBSERVATION)
    )
    if decisions.is_streaming != observations.is_streaming:
        raise UsageError("read both decisions and observations from Pub/Sub, or neither")
    if streaming and not decisions.is_streaming:
        raise UsageError(
            "--streaming reads --decisions_subscription and --observations_subscription"
        )
    for source in (decisions, observations):
        if source.pattern:
            try:
                require_files(source.pattern, f"--{source.kind}s")
            except NoFilesMatched as e:
                raise UsageError(str(e)) from None
    return JoinConfig(
        streaming=streaming,
        blueprint=blueprint,
        key=key,
        output=output,
        quarantine=quarantine,
        # Refused payloads are redacted where they are refused: no raw identifier of the
        # blueprint's privacy section reaches rejected/ (raw bytes only in --quarantine).
        privacy=PayloadPrivacy.from_blueprint(blueprint, key, quarantine=bool(quarantine)),
        allowed_lateness_ms=allowed_lateness_ms,
        output_window_ms=output_window_ms,
        num_shards=num_shards,
        observation_range=observation_range,
        decisions=decisions,
        observations=observations,
    )


def _required(value: str | None, flag: str) -> str:
    if not value:
        raise UsageError(f"{flag} is required")
    return value


def _load_blueprint(path: str | None) -> Blueprint:
    try:
        return read_blueprint(_required(path, "--blueprint"))
    except BlueprintError as e:
        raise UsageError(str(e)) from None


def _duration(value: str, flag: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _instant(value: str | None, flag: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return parse_event_time(value)
    except ValueError as e:
        raise UsageError(f"{flag}: {e}") from None


def _observation_range(start: str | None, end: str | None) -> ObservationRange:
    observation_range = ObservationRange(
        _instant(start, "--observations_from"), _instant(end, "--observations_until")
    )
    first, last = observation_range
    if first is not None and last is not None and last <= first:
        raise UsageError(
            f"--observations_until {end} must be later than --observations_from {start}"
        )
    return observation_range


def _num_shards(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        shards = int(value)
    except ValueError:
        shards = 0
    if shards < 1:
        raise UsageError(f"--num_shards must be a whole number of at least 1, got {value!r}")
    return shards


def _source(
    kind: str, pattern: str | None, table: str | None, subscription: str | None, format: str
) -> ReadEvents:
    flags = {
        f"--{kind}s": pattern,
        f"--{kind}s_table": table,
        f"--{kind}s_subscription": subscription,
    }
    given = [flag for flag, value in flags.items() if value]
    if not given:
        raise UsageError(f"no {kind} input: give one of {', '.join(flags)}")
    if len(given) > 1:
        raise UsageError(f"give only one {kind} input, got {' and '.join(given)}")
    if subscription:
        try:
            parse_subscription(subscription)
        except ValueError as e:
            raise UsageError(f"--{kind}s_subscription: {e}") from None
    if pattern and detect_format(pattern, format) == Format.TFRECORD:
        raise UsageError(
            f"--{kind}s {pattern!r} names TFRecord files: the join reads events (JSON lines or "
            "Avro; --format says which), not examples"
        )
    return ReadEvents(kind, pattern=pattern, table=table, subscription=subscription, format=format)


def build(pipeline: beam.Pipeline, config: JoinConfig) -> Any:
    """Adds the join to ``pipeline``: read, parse, join, write the span. Returns ``SpanResult``."""
    bp = config.blueprint
    raw_decisions = pipeline | "ReadDecisions" >> config.decisions
    raw_observations = pipeline | "ReadObservations" >> config.observations
    decision_messages, observation_messages = raw_decisions, raw_observations
    if config.streaming:
        timed_decisions = raw_decisions | "AssignEventTime[decisions]" >> assign_event_time(
            DECISION, config.allowed_lateness_ms, privacy=config.privacy
        )
        timed_observations = raw_observations | (
            "AssignEventTime[observations]"
            >> assign_event_time(OBSERVATION, config.allowed_lateness_ms, privacy=config.privacy)
        )
        decision_messages = timed_decisions.messages
        observation_messages = timed_observations.messages
    decisions = decision_messages | "ParseDecisions" >> ParseDecisions(
        bp, format=config.decisions.parse_format, privacy=config.privacy
    )
    observations = observation_messages | "ParseObservations" >> ParseObservations(
        bp, format=config.observations.parse_format, privacy=config.privacy
    )
    if config.quarantine:
        _ = (decisions.quarantined, observations.quarantined) | "WriteQuarantine" >> (
            WriteQuarantine(config.quarantine)
        )
    join = (decisions.events, observations.events) | "JoinDecisions" >> JoinDecisions(
        bp,
        allowed_lateness_ms=config.allowed_lateness_ms,
        # A streaming job joins in sessions whatever its source says about boundedness.
        windowing="session" if config.streaming else "auto",
        observation_range=config.observation_range,
    )
    rejected_decisions, rejected_observations = decisions.rejected, observations.rejected
    late_decisions = late_observations = None  # a batch job has no watermark to be behind
    if config.streaming:
        # bad_time messages are dead letters of the read (rejected/); late ones go to late/.
        rejected_decisions = (
            rejected_decisions,
            timed_decisions.rejected,
        ) | "FlattenRejected[decisions]" >> beam.Flatten()
        rejected_observations = (
            rejected_observations,
            timed_observations.rejected,
        ) | "FlattenRejected[observations]" >> beam.Flatten()
        late_decisions, late_observations = timed_decisions.late, timed_observations.late
    inputs = SpanInputs.from_join(
        join,
        rejected_decisions,
        rejected_observations,
        raw_decisions,
        raw_observations,
        late_decisions,
        late_observations,
    )
    return inputs | "WriteSpan" >> WriteSpan(
        config.output,
        bp,
        config.key,
        num_shards=config.num_shards,
        allowed_lateness_ms=config.allowed_lateness_ms,
        output_window_ms=config.output_window_ms if config.streaming else None,
        observation_range=config.observation_range,
    )


def run(argv: Sequence[str] | None = None) -> dict | None:
    """The join as a command (``python -m pipelines.join_decisions``): runs ``join`` through
    the shared launch path, so a bad argument or input prints ``join_decisions: error: <line>``
    and raises SystemExit(2); returns what ``join`` returns."""
    outcome: list = []
    status = launch_main(lambda args: outcome.append(join(args)), PROG, argv)
    if status:
        raise SystemExit(status)
    return outcome[0]


def join(argv: Sequence[str]) -> dict | None:
    """Options -> ``resolve`` -> ``build`` -> run; (batch) returns the span's manifest.

    Raises ``UsageError`` (one line) on bad arguments or inputs, before anything runs, or when
    another run claimed the span."""
    # Unknown or misspelt flags are refused, not dropped by Beam with a warning.
    options, join_options = parse_options(argv, JoinDecisionsOptions, PROG)
    if join_options.decisions_subscription or join_options.observations_subscription:
        # Pub/Sub makes it a streaming job; a Flex Template launch cannot pass --streaming.
        options.view_as(StandardOptions).streaming = True
    streaming = options.view_as(StandardOptions).streaming
    config = resolve(join_options, streaming)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, config)
    try:
        result = pipeline.run()
        if streaming:
            # A local runner executes in daemon threads: returning would end the job with
            # the process. A remote job (Dataflow) keeps running after the launcher returns.
            if _runs_locally(options):
                result.wait_until_finish()
            return None
        result.wait_until_finish()
    except SpanClaimLost as e:  # another run claimed the span: this one wrote nothing there
        raise UsageError(str(e)) from None
    manifest_path = FileSystems.join(config.output, MANIFEST)
    with FileSystems.open(manifest_path) as f:
        manifest = json.loads(f.read())
    # Counter values exist only once the run is over: they join the finished manifest.
    manifest["counters"] = counter_summary(result)
    write_json_atomically(manifest_path, manifest)
    _print_summary(manifest, manifest_path)
    return manifest


def _runs_locally(options: PipelineOptions) -> bool:
    """Whether the runner executes in this process (the default DirectRunner, Prism)."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return name is None or "Direct" in name or "Prism" in name


def _print_summary(manifest: dict, path: str) -> None:
    bp = manifest["blueprint"]
    print(f"{PROG}: blueprint {bp['name']} v{bp['version']} ({bp['content_hash'][:12]})")
    for name in COUNT_NAMES:
        print(f"  {name:<28} {manifest[name]:>10,}")
    delay = manifest["label_delay"]
    print(
        f"  label delay p50/p90/p99 ms    {delay['p50_ms']} / {delay['p90_ms']} / {delay['p99_ms']}"
    )
    print(f"  reconciles                    {manifest['reconciles']}")
    print("counters:")
    for name, value in manifest["counters"].items():
        print(f"  {name:<44} {value:>10,}")
    print(f"manifest: {path}")


if __name__ == "__main__":
    run()
