"""The monitor's readout: ``metrics.json`` assembled from the pipeline's per-group summaries.

Pure Python over the rows that ``transforms.monitoring`` writes (one summary per model and UTC day,
per blueprint version, label-delay histogram bins), so a readout can be recomputed, tested and
extended without running a pipeline. ``pipelines.monitor`` runs the Beam side and calls
``assemble_metrics``; ``loopline.report`` draws the same dict.

    >>> metrics = assemble_metrics(blueprint, summaries, delays, counters)
    >>> metrics["flagged_models"]
    []
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from loopline.blueprint import Blueprint, format_duration
from loopline.errors import UsageError
from loopline.experiment import (
    ARMS,
    CHALLENGER,
    PRODUCTION,
    WORSE,
    DayComparison,
    Moments,
    readout,
)
from loopline.metrics import two_proportion_test

# Summary dimensions (``transforms.monitoring.summary_keys``) and the day of an all-days group.
MODEL = "model"
ARM = "arm"
BLUEPRINT = "blueprint"
OBSERVABLE = "model_observable"  # a model's rows whose label was observable
ALL_DAYS = "all"
# The policies whose value the monitor estimates off-policy for each arm (``policy_values``).
LOGGED, GREEDY = "logged", "greedy"

DEFAULT_MAX_SKEW_JENSEN_SHANNON = 0.1  # numeric features
DEFAULT_MAX_SKEW_LINF = 0.1  # categorical features


class MonitorError(UsageError):
    """A monitor run that cannot start or cannot be judged: one sentence saying what to fix."""


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
    arms: dict[str, dict[str, dict]] = {}  # arm -> day -> summary
    for row in summaries:
        dimension, group, day = row.pop("dimension"), row.pop("group"), row.pop("day")
        if dimension == MODEL:
            model = models.setdefault(group, {"overall": None, "days": {}})
            if day == ALL_DAYS:
                model["overall"] = row
            else:
                model["days"][day] = row
        elif dimension == OBSERVABLE:
            models.setdefault(group, {"overall": None, "days": {}})["observable"] = row
        elif dimension == BLUEPRINT:
            versions[group] = row
        elif dimension == ARM:
            arms.setdefault(group, {})[day] = row
    for model_id, model in models.items():
        model.setdefault("observable", None)  # no row of this model had an observable label
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
            "observable_when": {column: list(values) for column, values in label.observable_when},
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
        "arms": arms,
        "flagged_models": sorted(m for m, v in models.items() if v["flags"]),
        "ab": ab,
        "label_delay": label_delay_section(delays, blueprint, manifest),
    }


@dataclass(frozen=True)
class DelayBins:
    """Fixed bins over observation offsets (observation time - decision time), in ms."""

    lower_ms: int
    upper_ms: int
    bins: int

    @classmethod
    def for_window(cls, window_ms: int, backward_slack_ms: int, bins: int = 48) -> DelayBins:
        """From before the backward slack to twice the window, so the window's edges show."""
        lower = -max(backward_slack_ms * 2, window_ms // 12)
        return cls(lower, 2 * window_ms, bins)

    def index(self, offset_ms: int) -> int:
        """0..bins-1 inside; -1 below, ``bins`` above."""
        if offset_ms < self.lower_ms:
            return -1
        if offset_ms >= self.upper_ms:
            return self.bins
        return int((offset_ms - self.lower_ms) * self.bins // (self.upper_ms - self.lower_ms))

    def edges(self) -> list[float]:
        width = (self.upper_ms - self.lower_ms) / self.bins
        return [self.lower_ms + i * width for i in range(self.bins + 1)]


_NO_ROWS = Moments(0, 0.0, 0.0, 0.0, 0.0, 0.0)


def experiment_section(blueprint: Blueprint, arm_rows: list[dict], unit_rows: list[dict]) -> dict:
    """The rollout experiment's readout from ``SummariseArms`` and ``CountUnitsPerArm`` rows.

    Rows without a ``metric`` are the primary metric (the label); rows tagged with a guardrail's
    name carry that guardrail's per-decision values. Arms are compared within each UTC day
    (``loopline.experiment.readout``), guardrails with the same machinery; a model that served
    an arm on any day is named under ``models``. Without rollout traffic in the input, or
    without a ``rollout`` section in the blueprint, says so instead of a verdict.
    """
    if not arm_rows:
        return {"skipped": "no scored decision carries an arm (no rollout in this input)"}
    if blueprint.rollout is None:
        return {"skipped": f"{blueprint.source} has no rollout section"}
    models: dict[str, set] = {arm: set() for arm in ARMS}
    metrics: dict[str | None, dict[str, dict[str, Moments]]] = {None: {}}
    for g in blueprint.rollout.guardrails:
        metrics[g.name] = {}
    for row in arm_rows:
        metric = row.get("metric")
        if row["arm"] not in ARMS or metric not in metrics:
            continue
        if metric is None:
            models[row["arm"]].add(row["model_id"])
        _add_moments(metrics[metric].setdefault(row["day"], {}), row)
    comparisons = {metric: _day_comparisons(days) for metric, days in metrics.items()}
    units = {row["arm"]: row["units"] for row in unit_rows}
    result = readout(
        comparisons.pop(None),
        blueprint.rollout,
        guardrails=comparisons,
        assignment=(units.get(PRODUCTION, 0), units.get(CHALLENGER, 0)),
        primary_name=blueprint.label.name,
    )
    return {
        "verdict": result.verdict,
        "sentence": result.sentence,
        "production": sorted(models[PRODUCTION]),
        "challenger": sorted(models[CHALLENGER]),
        "units": units,
        "days": sorted(metrics[None]),
        "figures": result.as_dict(),
        "guardrails": guardrail_rows(blueprint, result.guardrails, result.verdict == WORSE),
    }


def guardrail_rows(blueprint: Blueprint, readouts, judged: bool = True) -> list[dict]:
    """Every declared guardrail with its figures (None before both arms served a day), whether
    it fired, and what it measures in words. A guardrail fires when it is significantly worse
    for the challenger and the experiment is ``judged`` (a sample-ratio mismatch or too little
    exposure holds every verdict back, guardrails included)."""
    measured = {g.name: g for g in readouts}
    rows = []
    for g in blueprint.rollout.guardrails:
        figures = measured.get(g.name)
        rows.append(
            {
                "name": g.name,
                "observation": g.observation,
                "aggregation": g.aggregation,
                "direction": g.direction,
                "measures": f"{g.observation} per decision ({g.aggregation} of its observations "
                f"in the label window, 0 when none), {'higher' if g.direction == 'increase' else 'lower'}"
                " is better",
                "fired": judged and figures is not None and figures.outcome == "worse",
                "figures": None if figures is None else asdict(figures),
            }
        )
    return rows


def _add_moments(day: dict[str, Moments], row: dict) -> None:
    fields = {k: row[k] for k in ("n", "total", "total_sq", "decisions", "decisions_sq", "cross")}
    moments = Moments(**fields)
    current = day.get(row["arm"])
    if current is not None:  # two models served one arm that day: their rows add up
        moments = Moments(*(a + b for a, b in zip(_fields(current), _fields(moments), strict=True)))
    day[row["arm"]] = moments


def _day_comparisons(days: dict[str, dict[str, Moments]]) -> list[DayComparison]:
    return [
        DayComparison(day, arms.get(PRODUCTION, _NO_ROWS), arms.get(CHALLENGER, _NO_ROWS))
        for day, arms in sorted(days.items())
    ]


def policy_values_section(blueprint: Blueprint, rows: list[dict]) -> dict:
    """Off-policy values of each arm's live policy and of its greedy version
    (``transforms.monitoring.EstimatePolicyValues`` rows), sorted by arm, model and policy."""
    threshold = greedy_threshold(blueprint)
    return {
        "reward": f"{blueprint.label.name} per decision",
        "greedy_rule": None
        if threshold is None
        else f"decision 1 when the arm's score >= {threshold:g} (the blueprint policy "
        "without exploration)",
        "rows": sorted(rows, key=lambda r: (r["arm"] or "", r["model_id"], r["policy"])),
    }


def greedy_threshold(blueprint: Blueprint) -> float | None:
    """The threshold of the blueprint's threshold or epsilon-greedy policy (its greedy
    decision is 1 at or above it); None for other policies, whose greedy policy is not a
    threshold of the score."""
    policy = blueprint.policy or {}
    if policy.get("type", "threshold") not in ("threshold", "epsilon_greedy"):
        return None
    threshold = policy.get("threshold", 0.5)
    return float(threshold) if isinstance(threshold, int | float) else None


def _fields(m: Moments) -> tuple[float, ...]:
    return (m.n, m.total, m.total_sq, m.decisions, m.decisions_sq, m.cross)
