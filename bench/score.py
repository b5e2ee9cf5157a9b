"""Bulk scoring throughput: the full Beam pipeline against raw batched model calls, side by side.

    python -m bench.score [--rows 200000] [--batch_size 512] [--sweep 64,256,1024,4096]

On the same rows and the same model it measures

* the ceiling: a plain Python loop that encodes decisions with ``features_to_example`` and calls
  the SavedModel's serving signature once per batch (no Beam, no parsing, no writing);
* the pipeline: ``pipelines.bulk_score`` on the DirectRunner reading the rows as JSON lines,
  parsing and validating them, RunInference, the blueprint's policy, writing JSON lines;
* their ratio, and a batch-size sweep of both;

and writes everything to ``bench-out/score.json``. The model is the realistic tabular scorer from
``tests/scoring_fixtures.py`` at benchmark size: the example blueprint's raw features parsed in
the graph, Transform-like preprocessing (z-scores, hash buckets with 16-d embeddings, pooled
lists) and an MLP 512-256-128-1, about 330k parameters.
"""

from __future__ import annotations

import argparse
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
from loopline.events import parse_decision_json  # noqa: E402
from pipelines import bulk_score  # noqa: E402
from tests.scoring_fixtures import export_scoring_model, make_decisions  # noqa: E402
from transforms.examples import features_to_example, pii_key  # noqa: E402
from transforms.inference import LoadedModel, resolve_serving_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
MODEL = {"hidden_units": (512, 256, 128), "buckets": 2000, "embedding_dim": 16, "seed": 1}


def raw_ceiling(events, blueprint, key, model: LoadedModel, batch_size: int) -> dict:
    """Encode + one model call per batch in a plain loop; rows per second."""
    start = time.perf_counter()
    for i in range(0, len(events), batch_size):
        batch = events[i : i + batch_size]
        model.score(
            [features_to_example(e.features, blueprint, key).SerializeToString() for e in batch]
        )
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(events) / seconds),
    }


def parse_and_ceiling(lines, blueprint, key, model: LoadedModel, batch_size: int) -> dict:
    """The ceiling plus JSON parsing and validation, the one step it skips that the pipeline
    must do; the gap to the pipeline is then Beam's own per-element cost and the writing."""
    start = time.perf_counter()
    for i in range(0, len(lines), batch_size):
        batch = [parse_decision_json(line, blueprint) for line in lines[i : i + batch_size]]
        model.score(
            [features_to_example(e.features, blueprint, key).SerializeToString() for e in batch]
        )
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(lines) / seconds),
    }


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
    start = time.perf_counter()
    bulk_score.run(args)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    scored = manifest["counters"].get("loopline.score.decisions", 0)
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "rows_per_s": round(scored / seconds),
        "scored": scored,
        "batch_sizes_seen": manifest["distributions"][
            "loopline.inference.inference_request_batch_size"
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--sweep", default="64,256,1024,4096", help="Batch sizes for the sweep.")
    parser.add_argument(
        "--sweep_rows", type=int, default=None, help="Rows per sweep point (default: --rows)."
    )
    parser.add_argument("--output", default=str(REPO / "bench-out" / "score.json"))
    parser.add_argument("--beam_args", default="", help="Extra Beam options for the pipeline runs.")
    args = parser.parse_args(argv)

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
        model = LoadedModel(str(resolve_serving_model(str(serving), blueprint.name).path))
        extra = args.beam_args.split()

        model.score(
            [
                features_to_example(e.features, blueprint, key).SerializeToString()
                for e in events[:256]
            ]
        )  # warm the traced function
        ceiling = raw_ceiling(events, blueprint, key, model, args.batch_size)
        with_parse = parse_and_ceiling(
            [e.to_json() for e in events], blueprint, key, model, args.batch_size
        )
        full = pipeline(source, serving, work, args.batch_size, extra)
        serialized = [
            features_to_example(e.features, blueprint, key).SerializeToString() for e in events
        ]
        sweep_events = events[: args.sweep_rows or args.rows]
        sweep_source = source
        if len(sweep_events) < len(events):
            sweep_source = work / "sweep.jsonl"
            sweep_source.write_text("".join(e.to_json() + "\n" for e in sweep_events))
        sweep = []
        for size in (int(s) for s in args.sweep.split(",") if s):
            raw = raw_ceiling(sweep_events, blueprint, key, model, size)
            piped = pipeline(sweep_source, serving, work, size, extra)
            sweep.append({
                "batch_size": size,
                "raw_rows_per_s": raw["rows_per_s"],
                "pipeline_rows_per_s": piped["rows_per_s"],
                "ratio": round(piped["rows_per_s"] / raw["rows_per_s"], 3),
                "model_only_rows_per_s": model_only(serialized[: len(sweep_events)], model, size)["rows_per_s"],
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
            "raw_ceiling": ceiling,
            "pipeline": full,
            "ratio": round(full["rows_per_s"] / ceiling["rows_per_s"], 3),
            "parse_and_ceiling": with_parse,
            "ratio_to_parse_and_ceiling": round(full["rows_per_s"] / with_parse["rows_per_s"], 3),
            "sweep": sweep,
            "sweep_rows": len(sweep_events),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "runner": "DirectRunner " + (args.beam_args or "(defaults)"),
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(
        f"model: {report['model']['parameters']:,} parameters; rows: {args.rows:,}\n"
        f"raw ceiling (encode + batched calls, batch {args.batch_size}): "
        f"{ceiling['rows_per_s']:,} rows/s\n"
        f"pipeline (read, parse, RunInference, policy, write): {full['rows_per_s']:,} rows/s\n"
        f"ratio: {report['ratio']}\n"
        f"ceiling + JSON parsing: {with_parse['rows_per_s']:,} rows/s; "
        f"pipeline / that: {report['ratio_to_parse_and_ceiling']}"
    )
    for point in sweep:
        print(
            f"  batch {point['batch_size']:>5}: raw {point['raw_rows_per_s']:>8,}/s  "
            f"pipeline {point['pipeline_rows_per_s']:>8,}/s  ratio {point['ratio']}  "
            f"(model only {point['model_only_rows_per_s']:,}/s)"
        )
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
