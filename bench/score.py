"""Bulk scoring throughput: the full Beam pipeline against plain loops doing the same work.

    python -m bench.score [--rows 200000] [--batch_size 512] [--repeat 5] [--sweep 128,512,2048] [--sweep_repeat 3]

On the same JSON-lines file of decision events and the same model it measures

* the fair ceiling ("plain loop, same work"): a plain Python loop over the same file that does
  exactly what the pipeline does per row, with the pipeline's own functions: read the lines,
  parse and validate (``transforms.events.parse_one``), encode and score in batches (the
  encoder's ``encode_batch`` (``features_to_examples``) and the handler's ``run_inference`` (one
  serving-signature call per batch), the policy step's ``decide``, the output lines
  (``score_lines``) written to a file.
  Timed from model load to the closed output file, like the pipeline;
* the encode + model loop: decisions already parsed in memory, the same batch encoding and one
  model call per batch, nothing else (no read, parse, policy or write): how fast the model side
  alone could go, for reference;
* the pipeline: ``pipelines.bulk_score`` on the DirectRunner, wall clock from launch to finished
  outputs (pipeline construction and model load included); the loop and the pipeline run
  ``--repeat`` times in turn and the pair with the median ratio is reported, with every ratio;
* their ratios, and a batch-size sweep of all three (the median of ``--sweep_repeat`` pairs per
  point; plus the model alone on pre-encoded rows);

and writes everything to ``bench-out/score.json``. The model is the realistic tabular scorer from
``tests/scoring_fixtures.py`` at benchmark size: the example blueprint's raw features parsed in
the graph, Transform-like preprocessing (z-scores, hash buckets with 16-d embeddings, pooled
lists) and an MLP 512-256-128-1, about 330k parameters.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Synthetic rows only: the example blueprint pseudonymises user_id and needs some key.
os.environ.setdefault("LOOPLINE_PII_KEY", "bench-key-not-a-secret")

from loopline.blueprint import load_blueprint  # noqa: E402
from loopline.events import DECISION, DeadLetter  # noqa: E402
from loopline.examples import features_to_example, pii_key  # noqa: E402
from loopline.policy import policy_from_blueprint  # noqa: E402
from loopline.registry import resolve_serving_model  # noqa: E402
from loopline.scorer import LoadedModel  # noqa: E402
from pipelines import bulk_score  # noqa: E402
from tests.scoring_fixtures import export_scoring_model, make_decisions  # noqa: E402
from transforms.encoding import DecisionEncoder, EncodedDecision, EncodeFailure  # noqa: E402
from transforms.events import parse_one  # noqa: E402
from transforms.model_handler import SavedModelHandler  # noqa: E402
from transforms.policy_step import decide, utc_now  # noqa: E402
from transforms.score_output import score_lines  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
MODEL = {"hidden_units": (512, 256, 128), "buckets": 2000, "embedding_dim": 16, "seed": 1}


def encode_and_model(events, blueprint, key, model: LoadedModel, batch_size: int) -> dict:
    """Encode (the handler's batch encoder) + one model call per batch on parsed decisions in
    memory; nothing else."""
    encoder = DecisionEncoder(blueprint, key)
    start = time.perf_counter()
    for i in range(0, len(events), batch_size):
        model.score(encoder.encode_batch(events[i : i + batch_size]))
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(events) / seconds),
    }


def plain_loop(source: Path, serving: Path, blueprint, key, out: Path, batch_size: int) -> dict:
    """The fair ceiling: the pipeline's per-row work in a plain loop, file to file.

    Same functions as the pipeline: ``parse_one`` (refusals formatted as failure lines), the
    batch encoder, the handler's ``run_inference`` (one signature call), ``decide``,
    ``score_lines``, and a written output file; the model load is inside the timing, as in the
    pipeline.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    serving_model = resolve_serving_model(str(serving), blueprint.name)
    handler = SavedModelHandler(serving_model)
    encoder = DecisionEncoder(blueprint, key)
    model = handler.load_model()
    policy = policy_from_blueprint(blueprint)
    scored = 0
    with open(source, encoding="utf-8") as lines, open(out, "w", encoding="utf-8") as sink:
        batch: list = []
        for line in lines:
            event = parse_one(line.rstrip("\n"), DECISION, "json", blueprint)
            if isinstance(event, DeadLetter):
                sink.write(json.dumps(event.to_dict(), sort_keys=True) + "\n")
                continue
            batch.append(event)
            if len(batch) == batch_size:
                scored += _score_batch(batch, encoder, handler, model, policy, sink)
                batch = []
        if batch:
            scored += _score_batch(batch, encoder, handler, model, policy, sink)
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),
        "rows_per_s": round(scored / seconds),
        "scored": scored,
    }


def _score_batch(batch, encoder, handler: SavedModelHandler, model, policy, sink) -> int:
    encoded = [
        (event.decision_id, EncodedDecision(example, event))
        for event, example in zip(batch, encoder.encode_batch(batch), strict=True)
        if not isinstance(example, EncodeFailure)
    ]
    results = handler.run_inference([row for _, row in encoded], model)
    rows = [
        (decision_id, result) for (decision_id, _), result in zip(encoded, results, strict=True)
    ]
    scored = decide(policy, rows, utc_now())
    sink.write(score_lines(scored) + "\n")
    return len(scored)


def model_only(serialized, model: LoadedModel, batch_size: int) -> dict:
    """Model calls alone on pre-encoded examples (how much of the ceiling is the model)."""
    start = time.perf_counter()
    for i in range(0, len(serialized), batch_size):
        model.score(serialized[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "rows_per_s": round(len(serialized) / seconds)}


def pipeline(source: Path, serving: Path, work: Path, batch_size: int, extra: list[str]) -> dict:
    """The whole ``pipelines.bulk_score`` run, wall clock from launch to finished outputs."""
    out = work / f"out-{batch_size}"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "--input", str(source), "--model_dir", str(serving), "--blueprint", str(BLUEPRINT),
        "--output", str(out), "--min_batch_size", str(batch_size),
        "--max_batch_size", str(batch_size), *extra,
    ]  # fmt: skip
    start, cpu_start = time.perf_counter(), time.process_time()
    bulk_score.run(args)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    manifest = json.loads((out / "manifest.json").read_text())
    scored = manifest["counters"].get("score.decisions", 0)
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "rows_per_s": round(scored / seconds),
        "scored": scored,
        "batch_sizes_seen": manifest["distributions"]["inference.inference_request_batch_size"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--sweep", default="128,512,2048", help="Batch sizes for the sweep.")
    parser.add_argument(
        "--sweep_rows", type=int, default=None, help="Rows per sweep point (default: --rows)."
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="Loop/pipeline pairs at --batch_size; the pair with the median ratio is reported.",
    )
    parser.add_argument(
        "--sweep_repeat", type=int, default=3, help="Loop/pipeline pairs per sweep point."
    )
    parser.add_argument("--output", default=str(REPO / "bench-out" / "score.json"))
    parser.add_argument("--beam_args", default="", help="Extra Beam options for the pipeline runs.")
    args = parser.parse_args(argv)
    for name in ("repeat", "sweep_repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    blueprint = load_blueprint(BLUEPRINT)
    key = pii_key(blueprint)
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        serving = work / "serving"
        version_dir = export_scoring_model(blueprint, serving / "1", **MODEL)
        record = json.loads((serving / "1.record.json").read_text())
        events = make_decisions(blueprint, args.rows, seed=0)
        source = work / "decisions.jsonl"
        source.write_text("".join(e.to_json() + "\n" for e in events), encoding="utf-8")
        # Loaded through the handler, as the loop and the pipeline do, so that its one-time
        # garbage-collector freeze (transforms.model_handler) happens here, before any timing.
        model = SavedModelHandler(resolve_serving_model(str(serving), blueprint.name)).load_model()
        extra = args.beam_args.split()
        serialized = [
            features_to_example(e.features, blueprint, key).SerializeToString() for e in events
        ]
        model.score(serialized[:256])  # warm the traced function (and the OS file cache)

        # Side by side, each on the same file and the same model; the loop and the pipeline
        # alternate, so that a slower spell of a shared machine hits both alike.
        def median_pair(source: Path, size: int, repeat: int):
            """Loop and pipeline ``repeat`` times in turn: every ratio, and the median pair."""
            pairs = []
            for _ in range(repeat):
                looped = plain_loop(source, serving, blueprint, key, work / "loop.jsonl", size)
                piped = pipeline(source, serving, work, size, extra)
                pairs.append((piped["rows_per_s"] / looped["rows_per_s"], looped, piped))
            pairs.sort(key=lambda pair: pair[0])
            _, looped, piped = pairs[len(pairs) // 2]
            return [pair[0] for pair in pairs], looped, piped

        ratios, loop, full = median_pair(source, args.batch_size, args.repeat)
        encode_model = encode_and_model(events, blueprint, key, model, args.batch_size)
        fixed = pipeline(_head(source, work, 100), serving, work, args.batch_size, extra)
        assert full["scored"] == loop["scored"] == args.rows, (full["scored"], loop["scored"])

        sweep_events = events[: args.sweep_rows or args.rows]
        sweep_source = _head(source, work, len(sweep_events))
        sweep = []
        for size in (int(s) for s in args.sweep.split(",") if s):
            size_ratios, looped, piped = median_pair(sweep_source, size, args.sweep_repeat)
            raw = encode_and_model(sweep_events, blueprint, key, model, size)
            sweep.append({
                "batch_size": size,
                "plain_loop_rows_per_s": looped["rows_per_s"],
                "pipeline_rows_per_s": piped["rows_per_s"],
                "ratio": round(piped["rows_per_s"] / looped["rows_per_s"], 3),
                "ratios_of_each_pair": [round(r, 3) for r in size_ratios],
                "encode_and_model_rows_per_s": raw["rows_per_s"],
                "ratio_to_encode_and_model": round(piped["rows_per_s"] / raw["rows_per_s"], 3),
                "model_only_rows_per_s": model_only(serialized[: len(sweep_events)], model, size)["rows_per_s"],
                "pipeline_batch_sizes_seen": piped["batch_sizes_seen"],
            })  # fmt: skip
        report = {
            "model": {
                "kind": "MLP 512-256-128-1 over the notify blueprint's raw features, "
                "Transform-like preprocessing in the graph (z-score, hash-bucket 16-d "
                "embeddings, pooled lists), serving_default(examples) -> score",
                "parameters": record["parameters"],
                "saved_model_bytes": sum(
                    f.stat().st_size for f in version_dir.rglob("*") if f.is_file()
                ),
            },
            "rows": args.rows,
            "plain_loop_same_work": loop,
            "pipeline": full,
            "ratio": round(full["rows_per_s"] / loop["rows_per_s"], 3),
            "ratios_of_each_pair": [round(r, 3) for r in ratios],
            # CPU seconds of this process (all its threads): less sensitive to other jobs on a
            # shared machine than wall clock, which is what the throughput figures use.
            "cpu_ratio": round(loop["cpu_seconds"] / full["cpu_seconds"], 3),
            "encode_and_model_only": encode_model,
            "ratio_to_encode_and_model": round(
                full["rows_per_s"] / encode_model["rows_per_s"], 3
            ),
            "pipeline_fixed_seconds_100_rows": fixed["seconds"],
            "sweep": sweep,
            "sweep_rows": len(sweep_events),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "load_average": list(os.getloadavg())},
            "runner": "DirectRunner " + (args.beam_args or "(defaults)"),
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(
        f"model: {report['model']['parameters']:,} parameters; rows: {args.rows:,}; "
        f"batch {args.batch_size}; load average {os.getloadavg()[0]:.1f}\n"
        f"fair ceiling, plain loop doing the same work (read, parse, encode, batched model "
        f"calls, policy, write): {loop['rows_per_s']:,} rows/s\n"
        f"pipeline (bulk_score on the DirectRunner, wall clock incl. start-up): "
        f"{full['rows_per_s']:,} rows/s\n"
        f"ratio pipeline / fair ceiling: {report['ratio']} (median of {args.repeat} pairs: "
        f"{', '.join(str(r) for r in report['ratios_of_each_pair'])}); in CPU seconds "
        f"(loop / pipeline, same pair): {report['cpu_ratio']}\n"
        f"encode + batched model calls only (parsed rows in memory, no policy/write): "
        f"{encode_model['rows_per_s']:,} rows/s; pipeline / that: "
        f"{report['ratio_to_encode_and_model']}\n"
        f"pipeline fixed cost (100 rows): {fixed['seconds']} s"
    )
    for point in sweep:
        print(
            f"  batch {point['batch_size']:>5}: plain loop {point['plain_loop_rows_per_s']:>7,}/s"
            f"  pipeline {point['pipeline_rows_per_s']:>7,}/s  ratio {point['ratio']}"
            f"  | encode+model {point['encode_and_model_rows_per_s']:>7,}/s"
            f"  model only {point['model_only_rows_per_s']:>7,}/s"
        )
    print(f"wrote {output}")
    return report


def _head(source: Path, work: Path, rows: int) -> Path:
    """The first ``rows`` lines of ``source`` as their own file."""
    head = work / f"head-{rows}.jsonl"
    with open(source, encoding="utf-8") as f:
        head.write_text("".join(itertools.islice(f, rows)), encoding="utf-8")
    return head


if __name__ == "__main__":
    main()
