"""The rollout demo: a challenger earns or loses its traffic on a simulated product.

    python -m pipelines.demo --rollout better|worse|same --seed N --output DIR \\
        [--days 5] [--decisions_per_day 6000]

Two oracle models made from the simulator's hidden truth (``loopline.simulate.scenario_scorers``)
are registered in ``DIR/serving``: the production one, and a challenger that is truly better,
truly worse or truly the same (docs/rollout.md says how each is made). Then, for each simulated
day:

1. the simulated product decides through the real ``DecisionClient`` holding both scorers: each
   user's arm comes from the blueprint's ``rollout`` section, and every decision event carries
   its ``arm``, ``model_id``, ``score`` and ``propensity`` (``DIR/logs/<day>/``);
2. ``python -m pipelines.monitor`` reads every day's decisions and observations so far and
   compares the arms within each day with its sequential test (``DIR/monitor/dayN/``);
3. ``python -m pipelines.promote`` moves the aliases on that verdict (``promote`` below says
   how the demo hands it over).

It stops on the day the aliases move, or after ``--days``, and ends with one line:
``rollout: promoted …``, ``rollout: rolled back …`` or ``rollout: no change …``.

Made for the demo, and written down in ``DIR/rollout.json``:

- the models are oracle scorers, not SavedModels: their version directories in the serving
  dir hold only a note, and their records (``<version>.record.json``) say so. The registry's
  moves, the client, the monitor and promote are the real ones;
- the blueprint is a copy of ``--blueprint`` at ``DIR/blueprint.yaml`` with the rollout
  section set for a short demo (half the users in each arm, ``min_exposure`` lowered so a
  verdict can come on day one) and without the monitor's ``max_calibration_error``: the better
  and worse challengers are deliberately rescaled scores, whose calibration that threshold
  would flag (and a flag rolls a challenger back whatever its clicks say), so the demo would
  not show the experiment deciding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from loopline import registry, storage
from loopline.blueprint import Blueprint, load_blueprint
from loopline.simulate import SCENARIOS, FaultRates, Simulator, scenario_scorers

PROG = "python -m pipelines.demo --rollout"
DEFAULT_BLUEPRINT = "examples/notify.yaml"
DEMO_PII_KEY = "loopline-demo-key"  # as pipelines.demo: a real deployment reads a secret
MARKER = "rollout.json"  # written last; marks a directory this demo may empty on a rerun
DEMO_SHARE = 0.5
DEMO_MIN_EXPOSURE = 500
# Only the monitor threshold the rescaled scores trip on purpose is left out (module docstring).
DROPPED_MONITOR_KEYS = ("max_calibration_error",)


@dataclass(frozen=True)
class Model:
    """One registered oracle model: its registry record and its scorer."""

    record: dict
    scorer: object

    @property
    def model_id(self) -> str:
        return self.record["model_id"]

    @property
    def name(self) -> str:
        return self.record["name"]


@dataclass(frozen=True)
class RolloutDemo:
    """Settings and paths of one rollout demo run."""

    scenario: str
    output: Path
    source_blueprint: str
    days: int
    decisions_per_day: int
    start: datetime
    seed: int

    @property
    def blueprint_path(self) -> Path:
        return self.output / "blueprint.yaml"

    @property
    def serving_dir(self) -> str:
        return str(self.output / "serving")

    def day(self, i: int) -> str:
        return (self.start + timedelta(days=i)).strftime("%Y-%m-%d")

    def logs(self, i: int) -> Path:
        return self.output / "logs" / self.day(i)

    def at(self, i: int) -> str:
        """The start of simulated day ``i`` (``i`` + 1: its end) as the registry writes times."""
        return (self.start + timedelta(days=i)).isoformat(timespec="seconds")

    def monitor_dir(self, i: int) -> Path:
        return self.output / "monitor" / f"day{i + 1}"


def write_demo_blueprint(source: str, target: Path) -> Blueprint:
    """The demo's copy of ``source`` (module docstring); fails if ``source`` has no rollout."""
    data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("rollout"), dict):
        raise ValueError(f"blueprint {source} has no rollout section to run a rollout with")
    data["rollout"] = {
        **data["rollout"],
        "challenger_share": DEMO_SHARE,
        "min_exposure": DEMO_MIN_EXPOSURE,
    }
    monitor = {
        k: v for k, v in (data.get("monitor") or {}).items() if k not in DROPPED_MONITOR_KEYS
    }
    data["monitor"] = monitor
    header = (
        f"# The rollout demo's copy of {source}: rollout.challenger_share {DEMO_SHARE}, "
        f"rollout.min_exposure {DEMO_MIN_EXPOSURE},\n# monitor without "
        f"{', '.join(DROPPED_MONITOR_KEYS)} (see pipelines/rollout_demo.py).\n"
    )
    target.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_blueprint(target)


def register_models(demo: RolloutDemo, blueprint: Blueprint) -> tuple[Model, Model]:
    """Registers the scenario's two oracle models: version 1 in production, 2 as challenger."""
    sim = Simulator(blueprint, seed=demo.seed)
    records = [_record(demo, blueprint, version) for version in ("1", "2")]
    production_scorer, challenger_scorer = scenario_scorers(
        sim.response, demo.scenario, records[0]["model_id"], records[1]["model_id"]
    )
    for record in records:
        version_dir = Path(demo.serving_dir) / record["version"]
        version_dir.mkdir(parents=True)
        (version_dir / "ORACLE_SCORER.txt").write_text(record["note"] + "\n", encoding="utf-8")
        storage.write_json(registry.record_path(demo.serving_dir, record["version"]), record)
    production, challenger = records
    # Moved at the simulated start, so promote counts the challenger's days in simulated time.
    at = demo.at(0)
    registry.register(demo.serving_dir, production, at=at)
    registry.promote(
        demo.serving_dir,
        "rollout demo: the model already in production when the demo starts",
        at=at,
    )
    registry.register(demo.serving_dir, challenger, at=at)
    return Model(production, production_scorer), Model(challenger, challenger_scorer)


def _record(demo: RolloutDemo, blueprint: Blueprint, version: str) -> dict:
    role = "production" if version == "1" else f"{demo.scenario} challenger"
    return {
        # Fixed by the seed and scenario, so a rerun names the same models.
        "model_id": str(
            uuid.uuid5(
                uuid.NAMESPACE_URL, f"loopline-rollout-demo/{demo.seed}/{demo.scenario}/{version}"
            )
        ),
        "name": f"{blueprint.name}-{version}",
        "version": version,
        "blessed": True,
        "pushed": True,
        "blueprint": blueprint.summary(),
        "note": f"rollout demo: the {role}, an oracle scorer made from the simulator's hidden "
        "truth (loopline.simulate.scenario_scorers), not a SavedModel",
    }


def simulate_day(
    demo: RolloutDemo, blueprint: Blueprint, i: int, production: Model, challenger: Model
) -> dict:
    """One day of decisions through the client with both arms; returns the simulator's report."""
    sim = Simulator(
        blueprint,
        seed=demo.seed * 1000 + i,
        faults=FaultRates(0, 0, 0),
        users=max(100, demo.decisions_per_day // 2),
        scorer=production.scorer,
        challenger=challenger.scorer,
    )
    start_ms = int((demo.start + timedelta(days=i)).timestamp() * 1000)
    return sim.run(demo.logs(i), decisions=demo.decisions_per_day, days=1, start_ms=start_ms)


def run_module(demo: RolloutDemo, name: str, module: str, *args: str) -> int:
    """``python -m module args`` with its output in stage-logs/<name>.log; its exit status."""
    log_dir = demo.output / "stage-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "LOOPLINE_PII_KEY": os.environ.get("LOOPLINE_PII_KEY") or DEMO_PII_KEY}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(
            [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return result.returncode


def _require(demo: RolloutDemo, name: str, status: int, allowed: tuple[int, ...] = (0,)) -> None:
    if status not in allowed:
        log_path = demo.output / "stage-logs" / f"{name}.log"
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise SystemExit(
            f"demo: stage {name!r} failed (exit {status}); see {log_path}\n"
            + "\n".join("    " + line for line in tail)
        )


def monitor(demo: RolloutDemo, i: int) -> dict | None:
    """The monitor over every day so far; its verdict.json (None if it wrote none)."""
    logs = demo.output / "logs"
    out = demo.monitor_dir(i)
    name = f"monitor-day{i + 1}"
    status = run_module(
        demo,
        name,
        "pipelines.monitor",
        "--decisions",
        str(logs / "*" / "decisions-*.jsonl"),
        "--observations",
        str(logs / "*" / "observations-*.jsonl"),
        "--blueprint",
        str(demo.blueprint_path),
        "--output",
        str(out),
        "--fail_on_flags",
        "false",
    )
    _require(demo, name, status)
    path = out / "verdict.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def promote(demo: RolloutDemo, blueprint: Blueprint, i: int, verdict: dict) -> str:
    """``pipelines.promote`` on the day's verdict; returns the line it printed.

    It reads ``promote-verdict.json``: the monitor's verdict with ``at`` moved to the end of the
    simulated day, so an inconclusive split ends after ``rollout.max_days`` simulated days.
    """
    promotable = {**verdict, "at": demo.at(i + 1)}
    path = demo.monitor_dir(i) / "promote-verdict.json"
    path.write_text(json.dumps(promotable, indent=2), encoding="utf-8")
    name = f"promote-day{i + 1}"
    status = run_module(
        demo,
        name,
        "pipelines.promote",
        "--serving_dir",
        demo.serving_dir,
        "--verdict",
        str(path),
        "--max_days",
        str(blueprint.rollout.max_days),
    )
    # Exit 1 is an invalid experiment (nothing moved): reported, not a crash of the demo.
    _require(demo, name, status, allowed=(0, 1))
    lines = (demo.output / "stage-logs" / f"{name}.log").read_text(encoding="utf-8").splitlines()
    return next((line for line in reversed(lines) if line.startswith("promote:")), "")


def run(demo: RolloutDemo) -> str:
    """Runs the demo; returns its last line (also printed)."""
    blueprint = write_demo_blueprint(demo.source_blueprint, demo.blueprint_path)
    production, challenger = register_models(demo, blueprint)
    print(
        f"{demo.scenario} challenger {challenger.name} ({challenger.model_id}) against "
        f"production {production.name}, {DEMO_SHARE:.0%} of users each; serving dir "
        f"{demo.serving_dir}",
        flush=True,
    )
    truth: dict[str, list[float]] = {}
    days, verdict = [], None
    for i in range(demo.days):
        started = time.monotonic()
        report = simulate_day(demo, blueprint, i, production, challenger)
        for arm, figures in report["ground_truth"]["arms"].items():
            n, rate = figures["decisions"], figures["expected_label_rate"] or 0.0
            total = truth.setdefault(arm, [0, 0.0])
            total[0], total[1] = total[0] + n, total[1] + n * rate
        verdict = monitor(demo, i)
        line = promote(demo, blueprint, i, verdict) if verdict else "promote: not run (no verdict)"
        days.append({"day": demo.day(i), "verdict": verdict, "promote": line})
        said = verdict["verdict"] if verdict else "no verdict"
        print(
            f"day {i + 1} ({demo.day(i)}): {report['counts']['decisions']} decisions; "
            f"monitor: {said}; {line} ({time.monotonic() - started:.0f}s)\n"
            f"      report: {demo.monitor_dir(i) / 'report.html'}",
            flush=True,
        )
        aliases = registry.read_aliases(demo.serving_dir)
        if aliases.challenger != challenger.model_id:
            break
    last = _last_line(demo, production, challenger, verdict, len(days), truth)
    summary = {
        "scenario": demo.scenario,
        "seed": demo.seed,
        "production": production.record,
        "challenger": challenger.record,
        "blueprint": str(demo.blueprint_path),
        "days": days,
        "true_expected_click_rate": _rates(truth),
        "aliases": registry.read_aliases(demo.serving_dir).to_dict(),
        "result": last,
    }
    (demo.output / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(last, flush=True)
    return last


def _rates(truth: dict[str, list[float]]) -> dict[str, float | None]:
    return {arm: round(total / n, 6) if n else None for arm, (n, total) in sorted(truth.items())}


def _last_line(
    demo: RolloutDemo,
    production: Model,
    challenger: Model,
    verdict: dict | None,
    days: int,
    truth: dict[str, list[float]],
) -> str:
    aliases = registry.read_aliases(demo.serving_dir)
    rates = _rates(truth)
    true = (
        f"true click rate per decision: production {rates.get('production', 0):.4f}, "
        f"challenger {rates.get('challenger', 0):.4f}"
    )
    said = f"{verdict['verdict']}: {verdict['summary']}" if verdict else "no verdict"
    after = f"after {days} day{'s' if days != 1 else ''}"
    if aliases.challenger == challenger.model_id:
        return (
            f"rollout: no change {after}: {challenger.name} still serves {DEMO_SHARE:.0%} of "
            f"users next to {production.name} ({said}); {true}"
        )
    if aliases.production == challenger.model_id:
        return f"rollout: promoted {challenger.name} to production {after} ({said}); {true}"
    return (
        f"rollout: rolled back {challenger.name} {after}, {production.name} keeps all traffic "
        f"({said}); {true}"
    )


def _prepare(output: Path) -> None:
    """An empty ``output``: created, or emptied if an earlier rollout demo wrote it."""
    if output.exists() and any(output.iterdir()):
        if not (output / MARKER).exists() and not (output / "serving").exists():
            raise SystemExit(
                f"demo: error: --output {output} is not empty and not an earlier rollout demo's"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False
    )
    parser.add_argument("--rollout", required=True, choices=list(SCENARIOS))
    parser.add_argument("--output", required=True, help="where everything is written")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=5, help="most days to run the split")
    parser.add_argument("--decisions_per_day", type=int, default=6000)
    parser.add_argument("--blueprint", default=DEFAULT_BLUEPRINT)
    parser.add_argument("--start", default="2026-11-01", help="first simulated day (UTC)")
    args = parser.parse_args(argv)
    if args.days < 1 or args.decisions_per_day < 100:
        parser.error("--days must be at least 1 and --decisions_per_day at least 100")
    output = Path(args.output).resolve()
    _prepare(output)
    demo = RolloutDemo(
        scenario=args.rollout,
        output=output,
        source_blueprint=args.blueprint,
        days=args.days,
        decisions_per_day=args.decisions_per_day,
        start=datetime.strptime(args.start, "%Y-%m-%d").replace(tzinfo=timezone.utc),
        seed=args.seed,
    )
    try:
        run(demo)
    except ValueError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
