"""The whole Loopline loop on one machine: simulate, join, train, gate, score, measure, retrain.

    python -m pipelines.demo [--workdir demo-out] [--decisions_per_day 4000] [--days 3]
    python -m pipelines.demo --rollout better|worse|same --seed N --output DIR   (see
        pipelines/rollout_demo.py: a challenger earning or losing its traffic)

Every stage is the real entry point a user would run (``python -m pipelines.<name>``), started
as a subprocess on the DirectRunner with local files; its full output goes to
``WORKDIR/stage-logs/<stage>.log`` and the terminal shows one line of progress per stage and a
summary at the end. Re-running starts from an empty WORKDIR, so it is always safe.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from loopline.blueprint import load_blueprint
from loopline.simulate import FaultRates, Simulator, read_decisions

DEFAULT_BLUEPRINT = "examples/notify.yaml"
# The demo's pseudonymisation key: a real deployment takes it from a secret, never from code.
DEMO_PII_KEY = "loopline-demo-key"


@dataclass
class Demo:
    """Paths and settings of one demo run, and what it has learned so far."""

    workdir: Path
    blueprint_path: str
    days: int
    decisions_per_day: int
    start: datetime
    seed: int
    stage: int = 0
    stages: int = 9
    summary: dict = field(default_factory=dict)

    @property
    def blueprint(self):
        return load_blueprint(self.blueprint_path)

    def day(self, i: int) -> str:
        return (self.start + timedelta(days=i)).strftime("%Y-%m-%d")

    def logs(self, day: str) -> Path:
        return self.workdir / "logs" / day

    def span(self, day: str) -> Path:
        return self.workdir / "data" / self.blueprint.name / day

    @property
    def serving_dir(self) -> Path:
        return self.workdir / "serving"

    @property
    def pipeline_root(self) -> Path:
        return self.workdir / "tfx"

    def step(self, title: str) -> float:
        self.stage += 1
        print(f"[{self.stage}/{self.stages}] {title} ...", flush=True)
        return time.monotonic()

    def done(self, started: float, what: str) -> None:
        print(f"      {what} ({time.monotonic() - started:.0f}s)", flush=True)

    def run_module(self, name: str, module: str, *args: str) -> subprocess.CompletedProcess:
        """Runs ``python -m module args`` with its output in stage-logs/<name>.log."""
        log_dir = self.workdir / "stage-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        env = {**os.environ, "LOOPLINE_PII_KEY": os.environ.get("LOOPLINE_PII_KEY") or DEMO_PII_KEY}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.setdefault("TF_USE_LEGACY_KERAS", "1")
        with open(log_path, "w", encoding="utf-8") as log:
            result = subprocess.run(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        if result.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise SystemExit(
                f"demo: stage {name!r} failed (exit {result.returncode}); see {log_path}\n"
                + "\n".join("    " + line for line in tail)
            )
        return result


def simulate_days(demo: Demo) -> None:
    started = demo.step(f"simulate {demo.days} days of decisions through the decision client")
    totals = {"decisions": 0, "observations": 0}
    for i in range(demo.days):
        day = demo.day(i)
        sim = Simulator(demo.blueprint, seed=demo.seed + i)
        report = sim.run(
            demo.logs(day),
            decisions=demo.decisions_per_day,
            days=1,
            start_ms=_epoch_ms(demo.start + timedelta(days=i)),
        )
        totals["decisions"] += report["counts"]["decisions"]
        totals["observations"] += report["counts"]["observations"]
        demo.summary.setdefault("ground_truth_auc", report["ground_truth"]["auc_sent"])
    demo.summary["simulated"] = totals
    demo.done(
        started,
        f"{totals['decisions']} decisions, {totals['observations']} observations "
        f"in {demo.workdir / 'logs'}",
    )


def join_day(demo: Demo, day: str, decisions_glob: str, observations_glob: str) -> dict:
    demo.run_module(
        f"join-{day}",
        "pipelines.join_decisions",
        "--decisions",
        decisions_glob,
        "--observations",
        observations_glob,
        "--blueprint",
        demo.blueprint_path,
        "--output",
        str(demo.span(day)),
    )
    return json.loads((demo.span(day) / "manifest.json").read_text(encoding="utf-8"))


def join_days(demo: Demo) -> None:
    started = demo.step(f"join each day's decisions with their observations ({demo.days} spans)")
    examples = 0
    for i in range(demo.days):
        day = demo.day(i)
        logs = demo.logs(day)
        manifest = join_day(
            demo, day, str(logs / "decisions-*.jsonl"), str(logs / "observations-*.jsonl")
        )
        examples += manifest["examples_written"]
    demo.summary["examples"] = examples
    demo.done(started, f"{examples} examples in {demo.workdir / 'data'}; manifests reconcile")


def train(demo: Demo, cycle: int, spans: int) -> dict:
    started = demo.step(f"train with TFX on the newest {spans} spans (cycle {cycle})")
    demo.run_module(
        f"train-{cycle}",
        "pipelines.train",
        "--blueprint",
        demo.blueprint_path,
        "--dataset_root",
        str(demo.workdir / "data"),
        "--spans",
        str(spans),
        "--pipeline_root",
        str(demo.pipeline_root),
        "--serving_dir",
        str(demo.serving_dir),
    )
    records = sorted((demo.pipeline_root / "records").glob("*.json"), key=os.path.getmtime)
    record = json.loads(records[-1].read_text(encoding="utf-8"))
    verdict = f"blessed, pushed {record['name']}" if record["blessed"] else "not blessed"
    demo.summary.setdefault("models", []).append(
        {
            "cycle": cycle,
            "model_id": record.get("model_id"),
            "name": record.get("name"),
            "blessed": record["blessed"],
            "why": record.get("why"),
            "eval_auc": _overall_auc(record),
            # Treatment-aware training judges the rows whose label is observable (sent).
            "observable_auc": _slice_auc(record, _observable_slice(demo)),
            "truth_observable_auc": observable_truth_auc(demo, spans),
        }
    )
    demo.done(started, f"{verdict}: {record.get('why')}")
    return record


def score_next_day(demo: Demo) -> tuple[str, Path]:
    day = demo.day(demo.days)
    started = demo.step(f"score {day}'s decision requests with RunInference and the policy")
    requests = demo.logs(day) / "requests"
    # Requests to score come from the product's own service, without the log's faults.
    sim = Simulator(demo.blueprint, seed=demo.seed + demo.days, faults=FaultRates(0, 0, 0))
    sim.run(
        requests,
        decisions=demo.decisions_per_day,
        days=1,
        start_ms=_epoch_ms(demo.start + timedelta(days=demo.days)),
    )
    scores = demo.workdir / "scores" / day
    # A blessed push is only the challenger: no model has earned production yet, so the
    # demo scores the day with the challenger by name to monitor it. In production the
    # challenger serves the rollout's share of units (see the rollout stage).
    demo.run_module(
        "bulk_score",
        "pipelines.bulk_score",
        "--input",
        str(requests / "decisions-*.jsonl"),
        "--model_dir",
        str(demo.serving_dir),
        "--model_version",
        "challenger",
        "--blueprint",
        demo.blueprint_path,
        "--output",
        str(scores),
        "--log_decisions",
    )
    rows = sum(
        len(p.read_text(encoding="utf-8").splitlines()) for p in scores.glob("scores/*.jsonl")
    )
    demo.summary["scored"] = rows
    demo.done(started, f"{rows} decisions scored into {scores}")
    return day, scores


def simulate_outcomes(demo: Demo, day: str, scores: Path) -> Path:
    started = demo.step(f"simulate what happened after {day}'s scored decisions")
    outcomes = demo.logs(day) / "outcomes"
    decisions, skipped = read_decisions(str(scores / "decisions" / "*.jsonl"), demo.blueprint)
    report = Simulator(demo.blueprint, seed=demo.seed + demo.days).write_outcomes(
        outcomes, decisions, skipped
    )
    # Over every scored decision, as the monitor's AUC is: unsent notifications are negatives.
    demo.summary["live_ground_truth_auc"] = report["ground_truth"]["auc"]
    demo.done(started, f"{report['counts']['observations']} observations in {outcomes}")
    return outcomes


def monitor(demo: Demo, day: str, scores: Path, outcomes: Path) -> dict:
    started = demo.step("monitor the live model: metrics per model and day, skew, report")
    out = demo.workdir / "monitor"
    demo.run_module(
        "monitor",
        "pipelines.monitor",
        "--scores",
        str(scores / "scores" / "*.jsonl"),
        "--decisions",
        str(scores / "decisions" / "*.jsonl"),
        "--observations",
        str(outcomes / "observations-*.jsonl"),
        "--blueprint",
        demo.blueprint_path,
        "--output",
        str(out),
        "--manifest",
        str(demo.span(demo.day(demo.days - 1)) / "manifest.json"),
        *_training_stats(demo),
        # The demo shows what the monitor finds (the simulator drifts a feature on purpose);
        # in the daily DAG a fired flag fails the task.
        "--fail_on_flags",
        "false",
    )
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    demo.summary["report"] = str(out / "report.html")
    demo.summary["live"] = metrics
    demo.done(started, f"report at {out / 'report.html'}")
    return metrics


def _training_stats(demo: Demo) -> list[str]:
    """The newest StatisticsGen output of the TFX run: the monitor compares serving with it."""
    runs = sorted(
        (demo.pipeline_root / "StatisticsGen" / "statistics").glob("*"),
        key=lambda p: int(p.name) if p.name.isdigit() else -1,
    )
    return ["--training_stats", str(runs[-1])] if runs else []


def second_cycle(demo: Demo, day: str, scores: Path, outcomes: Path) -> None:
    started = demo.step(f"join {day}: the model's own decisions become training data")
    manifest = join_day(
        demo, day, str(scores / "decisions" / "*.jsonl"), str(outcomes / "observations-*.jsonl")
    )
    demo.summary["examples"] += manifest["examples_written"]
    demo.done(started, f"{manifest['examples_written']} examples")
    train(demo, cycle=2, spans=demo.days + 1)


def rollout(demo: Demo) -> None:
    """The rollout demo (pipelines.rollout_demo): a truly better challenger earns production
    through the two-arm client, the monitor's daily readout and pipelines.promote."""
    started = demo.step("roll out a challenger: both arms serve, the monitor decides, promote")
    out = demo.workdir / "rollout"
    demo.run_module(
        "rollout",
        "pipelines.demo",
        "--rollout",
        "better",
        "--seed",
        str(demo.seed),
        "--output",
        str(out),
    )
    log = (demo.workdir / "stage-logs" / "rollout.log").read_text(encoding="utf-8")
    line = next(line for line in reversed(log.splitlines()) if line.startswith("rollout:"))
    demo.summary["rollout"] = line
    demo.done(started, line)


def _observable_slice(demo: Demo) -> str | None:
    """The TFMA slice of the rows whose label is observable (``decision=1`` for notify)."""
    conditions = demo.blueprint.label.observable_when
    if len(conditions) != 1 or len(conditions[0][1]) != 1:
        return None
    column, (value,) = conditions[0]
    return f"{column}={value}"


def observable_truth_auc(demo: Demo, spans: int) -> float | None:
    """The ground truth's AUC on the observable eval rows of the newest ``spans`` spans: what
    the model's AUC on the same rows is compared with. The truth is the simulator's hidden
    click probability; the labels are the examples' own."""
    # The demo's own terminal shows one line per stage: keep TensorFlow's start-up logs and the
    # Google clients' deprecation warnings (each stage's log has them) out of it. The setting is
    # put back afterwards, so the stages started later still log TensorFlow's errors.
    quiet = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    if quiet:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return _observable_truth_auc(demo, spans)
    finally:
        if quiet:
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]


def _observable_truth_auc(demo: Demo, spans: int) -> float | None:
    import tensorflow as tf

    from loopline.metrics import auc
    from loopline.spans import find_spans

    p_click = {}
    # The simulated days' truth, and the scored day's (written with its outcomes).
    for path in (demo.workdir / "logs").rglob("truth.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            p_click[row["decision_id"]] = row["p_click"]
    label = demo.blueprint.label
    scores, labels = [], []
    for span in find_spans(str(demo.workdir / "data"), demo.blueprint.name, newest=spans):
        files = span.example_files("eval")
        for raw in tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator():
            feature = tf.train.Example.FromString(raw).features.feature
            row = {
                name: (feature[name].int64_list.value or feature[name].bytes_list.value or [None])[
                    0
                ]
                for name in ("decision", "arm", "model_id")
                if name in feature
            }
            row = {k: v.decode() if isinstance(v, bytes) else v for k, v in row.items()}
            decision_id = feature["decision_id"].bytes_list.value[0].decode()
            if label.is_observable(row) and decision_id in p_click:
                scores.append(p_click[decision_id])
                labels.append(int(feature[label.name].int64_list.value[0]))
    return auc(scores, labels) if scores else None


def _slice_auc(record: dict, name: str | None) -> float | None:
    metrics = (record.get("metrics") or {}).get(name) if name else None
    return (metrics or {}).get("auc")


def print_summary(demo: Demo, elapsed_s: float) -> None:
    s = demo.summary
    print("\n== Loopline demo summary ==")
    print(
        f"events simulated:   {s['simulated']['decisions']} decisions, "
        f"{s['simulated']['observations']} observations"
    )
    print(f"examples written:   {s['examples']} (train + eval, {demo.days + 1} spans)")
    for m in s.get("models", []):
        verdict = "BLESSED" if m["blessed"] else "not blessed"
        print(
            f"model cycle {m['cycle']}:      {m['name'] or '-'}  {verdict}  "
            f"eval AUC {_fmt(m['eval_auc'])}  ({m['why']})"
        )
        print(
            f"  on sent rows:     AUC {_fmt(m['observable_auc'])} vs ground truth "
            f"{_fmt(m['truth_observable_auc'])} on the same rows"
        )
    print(f"scored next day:    {s.get('scored', 0)} decisions with RunInference + policy")
    live_auc = _live_auc(s.get("live", {}))
    print(
        f"live AUC:           {_fmt(live_auc)} vs ground truth {_fmt(s.get('live_ground_truth_auc'))}"
    )
    for problem in s.get("live", {}).get("problems", []):
        print(f"monitor flag:       {problem}")
    print(f"report:             {s.get('report')}")
    print(f"{s.get('rollout', 'rollout: not run')}")
    print(
        f"took:               {elapsed_s / 60:.1f} min; stage logs in {demo.workdir / 'stage-logs'}"
    )
    (demo.workdir / "summary.json").write_text(json.dumps(s, indent=2, default=str) + "\n")


def _live_auc(metrics: dict) -> float | None:
    for model in (
        (metrics.get("models") or {}).values() if isinstance(metrics.get("models"), dict) else []
    ):
        overall = model.get("overall", model)
        if overall.get("auc") is not None:
            return overall["auc"]
    return None


def _overall_auc(record: dict) -> float | None:
    metrics = record.get("metrics") or {}
    overall = metrics.get("overall", metrics)
    for key in ("auc", "AUC"):
        if isinstance(overall, dict) and key in overall:
            return overall[key]
    return None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--rollout" or arg.startswith("--rollout=") for arg in argv):
        from pipelines import rollout_demo

        return rollout_demo.main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo",
        description=__doc__.split("\n")[0],
        epilog="With --rollout better|worse|same: the rollout demo instead "
        "(python -m pipelines.demo --rollout better --help).",
    )
    parser.add_argument(
        "--workdir", default="demo-out", help="where everything is written (emptied first)"
    )
    parser.add_argument("--blueprint", default=DEFAULT_BLUEPRINT)
    parser.add_argument(
        "--days", type=int, default=3, help="days of history before the first model"
    )
    parser.add_argument("--decisions_per_day", type=int, default=4000)
    parser.add_argument("--start", default="2026-11-01", help="first simulated day (UTC)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.days < 1 or args.decisions_per_day < 100:
        parser.error("--days must be at least 1 and --decisions_per_day at least 100")
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    demo = Demo(
        workdir,
        args.blueprint,
        args.days,
        args.decisions_per_day,
        datetime.strptime(args.start, "%Y-%m-%d").replace(tzinfo=timezone.utc),
        args.seed,
    )
    began = time.monotonic()
    simulate_days(demo)
    join_days(demo)
    first = train(demo, cycle=1, spans=demo.days)
    if not first["blessed"]:
        raise SystemExit(
            f"demo: the first model was not blessed ({first['why']}); see the stage logs"
        )
    day, scores = score_next_day(demo)
    outcomes = simulate_outcomes(demo, day, scores)
    monitor(demo, day, scores, outcomes)
    second_cycle(demo, day, scores, outcomes)
    rollout(demo)
    print_summary(demo, time.monotonic() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
