"""Benchmark of the join: the join pipeline, an identity pipeline and DuckDB, side by side.

    python -m bench.join                      # 200k simulated decisions
    python -m bench.join --decisions 20000 --direct_num_workers 2 --direct_running_mode multi_processing

On the same simulated logs (``loopline.simulate``), each contender runs in its own subprocess so
its peak memory is its own:

* ``join``: ``pipelines.join_decisions`` end to end on the DirectRunner (read, parse, join,
  encode, write the span and its manifest);
* ``identity``: a Beam pipeline over the same files that reads, parses (the same parse
  transforms) and writes TFRecords with no join: decisions as tf.Examples, observations as
  their JSON, both gzip;
* ``duckdb``: the same left join in DuckDB (read JSON, keep the earliest decision per id, drop
  exact repeated observations, filter to the label window, aggregate, left join, write Parquet),
  the single-machine reference.

Prints events/s for each, the join/identity and join/duckdb time ratios (wall-clock, and for
join/identity CPU time too, which a busy machine distorts less) and peak RSS, and
writes them to ``bench-out/join.json``. Times are wall-clock seconds of the work itself
(imports excluded), measured in one run on one machine: ratios, not absolute claims.

``--repeat N`` (for machines that are not quiet) runs the contenders N times in turn: pair i is
run i of each contender, measured one right after the other under much the same load. Each
contender reports its median run, and each headline ratio is the median of the N pair ratios
(join run i / identity run i), not the ratio of the median runs, which can set a quiet run of
one contender against a busy run of the other. The JSON keeps every pair's ratio under
``pair_ratios`` and, for comparison with older figures, the ratio of the median runs under
``ratios_of_median_runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
CONTENDERS = ("join", "identity", "duckdb")
TARGET_JOIN_OVER_IDENTITY = 1.2


def simulate(logs: Path, decisions: int, days: int, seed: int) -> dict:
    """Writes simulated logs once per (decisions, days, seed); returns the simulator's report."""
    from loopline.blueprint import load_blueprint
    from loopline.simulate import Simulator

    report_path = logs / "simulation.json"
    stamp = {"decisions": decisions, "days": days, "seed": seed}
    if report_path.exists() and json.loads(report_path.read_text()).get("bench") == stamp:
        return json.loads(report_path.read_text())
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    report = Simulator(load_blueprint(BLUEPRINT), seed=seed).run(
        logs, decisions=decisions, days=days, start_ms=START_MS
    )
    report["bench"] = stamp
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


# ---------------------------------------------------------------------------------------------
# The contenders, each run in a child process


def beam_args(args: argparse.Namespace) -> list[str]:
    out = [f"--direct_num_workers={args.direct_num_workers}"]
    if args.direct_running_mode:
        out.append(f"--direct_running_mode={args.direct_running_mode}")
    return out


def run_join(logs: Path, out: Path, extra: list[str]) -> dict:
    from pipelines.join_decisions import run

    manifest = run(
        [
            f"--decisions={logs}/decisions-*.jsonl",
            f"--observations={logs}/observations-*.jsonl",
            f"--blueprint={BLUEPRINT}",
            f"--output={out}",
            *extra,
        ]
    )
    return {
        "examples": manifest["examples_written"],
        "observed": manifest["examples_observed"],
        "rejected_decisions": manifest["rejected_decisions"],
        "reconciles": manifest["reconciles"],
    }


def run_identity(logs: Path, out: Path, extra: list[str]) -> dict:
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.options.pipeline_options import PipelineOptions

    from loopline.blueprint import load_blueprint
    from loopline.examples import features_to_example, pii_key
    from transforms.events import ParseDecisions, ParseObservations

    blueprint = load_blueprint(BLUEPRINT)
    key = pii_key(blueprint)

    def to_example(decision) -> bytes:
        return features_to_example(decision.features, blueprint, key).SerializeToString()

    with beam.Pipeline(options=PipelineOptions(extra)) as p:
        decisions = (
            p
            | "ReadDecisions" >> beam.io.ReadFromText(f"{logs}/decisions-*.jsonl")
            | "ParseDecisions" >> ParseDecisions(blueprint)
        )
        observations = (
            p
            | "ReadObservations" >> beam.io.ReadFromText(f"{logs}/observations-*.jsonl")
            | "ParseObservations" >> ParseObservations(blueprint)
        )
        _ = (
            decisions.events
            | "Encode" >> beam.Map(to_example)
            | "WriteDecisions"
            >> beam.io.WriteToTFRecord(
                f"{out}/decisions/part",
                file_name_suffix=".tfrecord.gz",
                compression_type=CompressionTypes.GZIP,
            )
        )
        _ = (
            observations.events
            | "ToJson" >> beam.Map(lambda o: o.to_json().encode())
            | "WriteObservations"
            >> beam.io.WriteToTFRecord(
                f"{out}/observations/part",
                file_name_suffix=".tfrecord.gz",
                compression_type=CompressionTypes.GZIP,
            )
        )
    return {}


DUCKDB_SQL = """
CREATE TEMP TABLE decisions AS
SELECT decision_id, try_cast(event_time AS TIMESTAMPTZ) AS t, features, decision, model_id,
       propensity, blueprint_version
FROM read_json('{logs}/decisions-*.jsonl', format='newline_delimited', ignore_errors=true,
     columns={{decision_id: 'VARCHAR', decision_type: 'VARCHAR', event_time: 'VARCHAR',
               features: 'JSON', decision: 'BIGINT', model_id: 'VARCHAR',
               propensity: 'DOUBLE', blueprint_version: 'VARCHAR'}})
WHERE decision_id IS NOT NULL AND decision_type = '{name}' AND features IS NOT NULL
  AND regexp_matches(event_time, '(Z|[+-][0-9][0-9]:[0-9][0-9])$');

CREATE TEMP TABLE observations AS
SELECT DISTINCT decision_id, try_cast(event_time AS TIMESTAMPTZ) AS t, observations
FROM read_json('{logs}/observations-*.jsonl', format='newline_delimited', ignore_errors=true,
     columns={{decision_id: 'VARCHAR', event_time: 'VARCHAR', observations: 'JSON'}})
WHERE decision_id IS NOT NULL AND observations IS NOT NULL
  AND regexp_matches(event_time, '(Z|[+-][0-9][0-9]:[0-9][0-9])$');

COPY (
  WITH kept AS (
    SELECT * EXCLUDE (rn) FROM (
      SELECT *, row_number() OVER (PARTITION BY decision_id ORDER BY t, features::VARCHAR) AS rn
      FROM decisions WHERE t IS NOT NULL) WHERE rn = 1
  ),
  labels AS (
    SELECT k.decision_id,
           max(try_cast(json_extract(o.observations, '$.{observation}') AS DOUBLE)) AS label,
           count(*) AS observations_used
    FROM kept k JOIN observations o USING (decision_id)
    WHERE o.t BETWEEN k.t - INTERVAL {slack_ms} MILLISECOND AND k.t + INTERVAL {window_ms} MILLISECOND
    GROUP BY k.decision_id
  )
  SELECT k.*, coalesce(l.label, {default}) AS label,
         CASE WHEN l.label IS NULL THEN 'default' ELSE 'observed' END AS join_status
  FROM kept k LEFT JOIN labels l USING (decision_id)
) TO '{out}/examples.parquet' (FORMAT PARQUET);
"""


def run_duckdb(logs: Path, out: Path, extra: list[str]) -> dict:
    import duckdb

    from loopline.blueprint import load_blueprint

    label = load_blueprint(BLUEPRINT).label
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(
        DUCKDB_SQL.format(
            logs=logs,
            out=out,
            name="notify",
            observation=label.observation,
            slack_ms=label.backward_slack_ms,
            window_ms=label.window_ms,
            default=label.default,
        )  # fmt: skip
    )
    examples, observed = con.execute(
        f"SELECT count(*), count(*) FILTER (join_status = 'observed') FROM '{out}/examples.parquet'"
    ).fetchone()
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    return {"examples": examples, "observed": observed, "threads": threads}


def warm_up_logs(logs: Path, warm: Path, lines: int = 200) -> Path:
    """A few hundred lines of the first decision and observation files."""
    shutil.rmtree(warm, ignore_errors=True)
    warm.mkdir(parents=True)
    for kind in ("decisions", "observations"):
        first = sorted(logs.glob(f"{kind}-*.jsonl"))[0]
        with open(first) as f:
            head = [line for _, line in zip(range(lines), f, strict=False)]
        (warm / f"{kind}-warm.jsonl").write_text("".join(head))
    return warm


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes), user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def child(mode: str, logs: Path, out: Path, extra: list[str]) -> None:
    """Runs one contender and prints one JSON line: seconds, peak RSS and what it wrote."""
    os.environ.setdefault("LOOPLINE_PII_KEY", "bench-key-not-a-secret")
    runner = {"join": run_join, "identity": run_identity, "duckdb": run_duckdb}[mode]
    shutil.rmtree(out, ignore_errors=True)
    # Imports and the runner's first-use costs are not the work being compared: a warm-up run
    # on a few hundred lines pays them untimed.
    runner(warm_up_logs(logs, out.parent / "warm-up-logs"), out.parent / f"warm-up-{mode}", extra)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    info = runner(logs, out, extra)
    seconds = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": round(max(own, workers), 1),
                      "worker_peak_rss_mb": round(workers, 1), **info}))  # fmt: skip


def measure(mode: str, logs: Path, work: Path, extra: list[str]) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_USE_LEGACY_KERAS="1")
    command = [sys.executable, "-m", "bench.join", "--child", mode, "--logs", str(logs),
               "--work", str(work / mode), "--", *extra]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench.join: {mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle one of an even count), with every time.

    >>> median_run([{"seconds": 3.0}, {"seconds": 1.0}, {"seconds": 2.0}])["seconds"]
    2.0
    """
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "all_seconds": [round(r["seconds"], 2) for r in runs],
    }


# The ratios reported: name -> (numerator, denominator, measure).
RATIOS = {
    "join_over_identity": ("join", "identity", "seconds"),
    # CPU time is what a shared machine distorts least (wall-clock waits for other jobs).
    "join_over_identity_cpu": ("join", "identity", "cpu_seconds"),
    "join_over_duckdb": ("join", "duckdb", "seconds"),
}


def pair_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """For each ratio of ``RATIOS`` whose contenders both ran: run i over run i, for every i.

    >>> pair_ratios({"join": [{"seconds": 3.0}, {"seconds": 4.0}],
    ...              "duckdb": [{"seconds": 2.0}, {"seconds": 4.0}]})
    {'join_over_duckdb': [1.5, 1.0]}
    """
    return {
        name: [n[measure] / d[measure] for n, d in zip(runs[top], runs[bottom], strict=True)]
        for name, (top, bottom, measure) in RATIOS.items()
        if top in runs and bottom in runs
    }


def headline_ratios(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Each ratio as the median of its pair ratios (``pair_ratios``), rounded to 0.01.

    >>> headline_ratios({"join": [{"seconds": 10.0}, {"seconds": 13.0}, {"seconds": 30.0}],
    ...                  "duckdb": [{"seconds": 10.0}, {"seconds": 6.0}, {"seconds": 20.0}]})
    {'join_over_duckdb': 1.5}
    """
    return {name: round(statistics.median(r), 2) for name, r in pair_ratios(runs).items()}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.join", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default="bench-out/join-work", help="logs and outputs go here")
    parser.add_argument("--out", default="bench-out/join.json")
    parser.add_argument("--direct_num_workers", type=int, default=1)
    parser.add_argument(
        "--direct_running_mode", default="in_memory",
        choices=["in_memory", "multi_threading", "multi_processing"],
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each contender, in turn; median runs and median pair ratios reported",
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--logs", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    if args.child:
        child(args.child, Path(args.logs), work, args.extra)
        return None

    report = simulate(work / "logs", args.decisions, args.days, args.seed)
    counts = report["counts"]
    events = counts["decision_lines"] + counts["observation_lines"]
    extra = beam_args(args)
    runs: dict[str, list[dict]] = {mode: [] for mode in args.only}
    for _ in range(max(1, args.repeat)):
        for mode in args.only:
            runs[mode].append(measure(mode, work / "logs", work, extra))
    results = {mode: median_run(measured) for mode, measured in runs.items()}
    ratios = headline_ratios(runs)
    of_median_runs = headline_ratios({mode: [result] for mode, result in results.items()})
    for result in results.values():
        result["events_per_s"] = round(events / result["seconds"])
        result["seconds"] = round(result["seconds"], 2)
        result["cpu_seconds"] = round(result["cpu_seconds"], 2)
    summary = {
        "decisions": counts["decisions"],
        "events": events,
        "beam_options": extra,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "ratios": ratios,  # medians of the pair ratios (module docstring)
        "pair_ratios": {
            name: [round(r, 3) for r in values] for name, values in pair_ratios(runs).items()
        },
        "ratios_of_median_runs": of_median_runs,
        "target_join_over_identity": TARGET_JOIN_OVER_IDENTITY,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"bench.join: {counts['decisions']:,} decisions, {events:,} events, {' '.join(extra)}")
    for mode, r in results.items():
        print(f"  {mode:<9} {r['seconds']:>8.2f} s ({r['cpu_seconds']:.2f} s CPU)  "
              f"{r['events_per_s']:>9,} events/s  "
              f"peak RSS {r['peak_rss_mb']:>7.1f} MB")  # fmt: skip
    for name, value in ratios.items():
        pairs = summary["pair_ratios"][name]
        each = f"  (median of {len(pairs)} pairs: {' '.join(f'{r:.2f}' for r in pairs)})"
        print(f"  {name:<22} {value:.2f}x{each if len(pairs) > 1 else ''}")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
