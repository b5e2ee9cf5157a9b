"""A synthetic product that drives the real decision client (DESIGN.md, "Simulator").

A population of users with stable traits receives decisions spread over each simulated day.
Each decision goes through ``DecisionClient.get_decision`` and a ``JsonLinesSink`` driven by a
simulated clock; what happens afterwards comes from a hidden ground-truth logistic response
model computed from the logged features, so a trained model has real signal and can be compared
with the truth. Clicks arrive after heavy-tailed (lognormal) delays, some past the label window;
a click is often followed by a ``dwell_seconds`` observation; nothing is clicked when the
decision is 0 (not sent). On top of the clean logs the simulator injects, at configurable rates,
exact re-deliveries of decision and observation events, orphan observations and malformed
lines, and reports how many of each it wrote.

Everything is fixed by the seed: the same arguments write byte-identical files.

    python -m loopline.simulate --blueprint examples/notify.yaml --output LOGS \\
        --decisions 20000 --days 2 --start 2026-11-01 --seed 1
    python -m loopline.simulate --blueprint examples/notify.yaml --output OUTCOMES \\
        --outcomes_for 'SCORES/decisions-*.jsonl' --seed 1
    python -m loopline.simulate --blueprint examples/notify.yaml --output LOGS \\
        --decisions 4000 --rollout better --seed 1      # production and a known-better challenger

Python API: ``Simulator(blueprint, seed).run(output, decisions=..., days=..., start_ms=...)``
and ``Simulator(blueprint, seed).outcomes(decision_events)``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import heapq
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

from loopline.blueprint import Blueprint, BlueprintError, load_blueprint
from loopline.client import DecisionClient
from loopline.events import (
    BAD_JSON,
    BAD_TIME,
    FEATURE_TYPE,
    LABEL_TYPE,
    MISSING_FIELD,
    UNKNOWN_FEATURE,
    WRONG_TYPE,
    DecisionEvent,
    ObservationEvent,
    parse_decision_json,
    parse_event_time,
)
from loopline.sinks import JsonLinesSink

DAY_MS = 86_400_000
TRUTH_FILE = "truth.jsonl"
REPORT_FILE = "simulation.json"
DWELL = "dwell_seconds"

# ---------------------------------------------------------------------------------------------
# The population: users with stable traits, and the features a decision sees


COUNTRIES = {"US": 0.30, "IN": 0.18, "BR": 0.12, "DE": 0.10, "GB": 0.10, "KR": 0.10, "JP": 0.10}
UTC_OFFSET_H = {"US": -5, "IN": 5, "BR": -3, "DE": 1, "GB": 0, "KR": 9, "JP": 9}
PLATFORMS = {"android": 0.48, "ios": 0.42, "web": 0.10}
TOPICS = {"news": 0.25, "sports": 0.2, "deals": 0.2, "social": 0.15, "weather": 0.1, "finance": 0.1}
# Share of a day's decisions made in each UTC hour: busiest in the (European/American) day.
HOURLY_LOAD = [2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 6, 5, 4, 3]


@dataclass(frozen=True)
class User:
    """Stable traits of one user; decision features are drawn around them."""

    user_id: str
    email: str
    tenure_days: int  # at the start of the simulation
    country: str
    platform: str
    open_rate_30d: float
    clicks_per_day: float  # drives recent_clicks
    sends_per_week: float  # drives sends_last_7d


def make_population(size: int, seed: int) -> list[User]:
    """``size`` users, fixed by ``seed``."""
    rng = random.Random(f"{seed}/population")
    users = []
    for i in range(size):
        engagement = rng.betavariate(2, 8)  # mean 0.2: most users rarely open notifications
        users.append(
            User(
                user_id=f"u{i:07d}",
                email=f"user{i}@example.com",
                tenure_days=int(rng.lognormvariate(math.log(200), 1.2)),
                country=_pick(rng, COUNTRIES),
                platform=_pick(rng, PLATFORMS),
                open_rate_30d=round(engagement, 4),
                clicks_per_day=0.1 + 3 * engagement * rng.random(),
                sends_per_week=rng.uniform(1, 14),
            )
        )
    return users


def notify_features(user: User, time_ms: int, day: int, rng: random.Random) -> dict[str, Any]:
    """The features of one notification decision for ``user`` at ``time_ms``."""
    utc_hour = (time_ms // 3_600_000) % 24
    k = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)
    topics = sorted({_pick(rng, TOPICS) for _ in range(k)})
    favourite = _favourite_topic(user.user_id)
    return {
        "user_id": user.user_id,
        "email": user.email,
        "tenure_days": user.tenure_days + day,
        "country": user.country,
        "platform": user.platform,
        "hour_of_day": (utc_hour + UTC_OFFSET_H[user.country]) % 24,
        "sends_last_7d": _poisson(rng, user.sends_per_week),
        "open_rate_30d": user.open_rate_30d,
        "recent_clicks": [float(_poisson(rng, user.clicks_per_day)) for _ in range(7)],
        "topics": topics,
        # The product's profile of the user, kept from a long history: the response model's
        # per-user parts, visible only to a blueprint that logs these names.
        "click_rate_90d": round(_click_rate_90d(user.user_id), 4),
        "favourite_topic": favourite,
        "favourite_topic_match": int(favourite in topics),
    }


def blueprint_features(
    blueprint: Blueprint, user: User, time_ms: int, day: int, rng: random.Random
) -> dict[str, Any]:
    """Exactly the blueprint's features: the product's own where the name is known (cast to the
    declared type), a generic value of the declared type otherwise."""
    known = notify_features(user, time_ms, day, rng)
    features = {}
    for feature in blueprint.features:
        if feature.name in known:
            features[feature.name] = _cast(known[feature.name], feature.type)
        else:
            features[feature.name] = _generic_value(rng, feature.type)
    return features


# ---------------------------------------------------------------------------------------------
# The hidden ground truth


class ResponseModel:
    """P(click | features, sent): a logistic model with real signal and some hidden parts.

    Most of the signal comes from logged features (engagement, fatigue, local hour, platform,
    topics). A per-user taste and favourite topic, derived from ``user_id``, add the rest. The
    product keeps them in its profile of the user (``click_rate_90d``, ``favourite_topic``,
    ``favourite_topic_match``): a blueprint that logs those names lets a model learn the whole
    truth; one that does not leaves the per-user parts to be inferred from each user's own rows
    (``python -m bench.auc_ceiling`` measures what that costs). The profile features never enter
    the response themselves. Features the product does not know get small effects derived from
    their names, so any blueprint gets some signal.
    """

    INTERCEPT = -2.6
    HOUR = {**dict.fromkeys(range(0, 6), -0.9), 7: 0.2, 8: 0.2, 9: 0.1,
            **dict.fromkeys(range(18, 23), 0.45)}  # fmt: skip
    PLATFORM = {"ios": 0.25, "android": 0.0, "web": -0.45}
    COUNTRY = {"US": 0.1, "KR": 0.3, "DE": -0.2, "BR": 0.2, "IN": 0.0, "JP": -0.1, "GB": -0.05}
    TOPIC = {"news": 0.3, "sports": 0.1, "deals": -0.4, "social": 0.2, "weather": -0.2}
    FAVOURITE_LIFT = 0.8  # when the user's favourite topic is among the notification's topics

    def __init__(self, blueprint: Blueprint):
        self.blueprint = blueprint
        known = {
            "open_rate_30d", "recent_clicks", "sends_last_7d", "hour_of_day", "platform",
            "country", "tenure_days", "topics", "user_id", "email", "click_rate_90d",
            "favourite_topic", "favourite_topic_match",
        }  # fmt: skip
        self.generic = [f for f in blueprint.features if f.name not in known]

    def click_probability(self, features: dict[str, Any]) -> float:
        z = self.logit(features)
        if math.isnan(z):  # absurd feature values from elsewhere: no information
            z = self.INTERCEPT
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def logit(self, f: dict[str, Any]) -> float:
        z = self.INTERCEPT
        z += 4.0 * (_number(f.get("open_rate_30d"), 0.2) - 0.2)
        z += 0.45 * math.log1p(sum(_numbers(f.get("recent_clicks"))))
        z -= 0.08 * _number(f.get("sends_last_7d"), 5)
        z += self.HOUR.get(int(_number(f.get("hour_of_day"), 12)) % 24, 0.0)
        z += self.PLATFORM.get(_string(f.get("platform")), 0.0)
        z += self.COUNTRY.get(_string(f.get("country")), 0.0)
        z += 0.35 if _number(f.get("tenure_days"), 365) < 30 else 0.0
        topics = _strings(f.get("topics"))
        if topics:
            z += sum(self.TOPIC.get(t, 0.0) for t in topics) / len(topics)
        user_id = _string(f.get("user_id"))
        if user_id is not None:
            z += _taste(user_id)
            if _favourite_topic(user_id) in topics:
                z += self.FAVOURITE_LIFT
        for feature in self.generic:
            z += _generic_effect(feature.name, f.get(feature.name))
        return z


@dataclass(frozen=True)
class DelayModel:
    """Lognormal delays: a median of a few minutes and a heavy tail past an hour."""

    median_s: float = 300.0
    sigma: float = 1.6

    def draw_ms(self, rng: random.Random) -> int:
        return max(1000, int(rng.lognormvariate(math.log(self.median_s), self.sigma) * 1000))

    def share_within(self, window_ms: int) -> float:
        """P(delay <= window)."""
        return NormalDist().cdf((math.log(window_ms / 1000) - math.log(self.median_s)) / self.sigma)


# ---------------------------------------------------------------------------------------------
# The simulation


class SimulatedClock:
    """A clock the simulator moves; ``clock()`` returns epoch seconds like ``time.time``."""

    def __init__(self, now_ms: int = 0):
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


@dataclass(frozen=True)
class FaultRates:
    """How often the simulated product misbehaves, per event it logs."""

    duplicate: float = 0.01  # an exact re-delivery of a decision or an observation
    orphan: float = 0.005  # an observation for a decision id nobody made, per decision
    malformed: float = 0.002  # a broken line next to a decision or an observation

    def __post_init__(self):
        for name in ("duplicate", "orphan", "malformed"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"--{name}_rate must be in [0, 1], got {value!r}")


class Simulator:
    """The synthetic product of one blueprint, fixed by ``seed``.

    >>> sim = Simulator(load_blueprint("examples/notify.yaml"), seed=1)
    >>> report = sim.run("LOGS", decisions=1000, days=1, start_ms=1793491200000)
    >>> report["counts"]["decisions"]
    1000
    """

    def __init__(
        self,
        blueprint: Blueprint,
        seed: int = 0,
        faults: FaultRates = FaultRates(),
        delays: DelayModel = DelayModel(),
        scorer: Callable[[dict[str, Any]], float] | None = None,
        users: int | None = None,
        file_age_s: float = 3600.0,
        challenger: Callable[[dict[str, Any]], float] | None = None,
    ):
        self.blueprint = blueprint
        self.seed = seed
        self.faults = faults
        self.delays = delays
        self.scorer = scorer
        self.users = users
        self.file_age_s = file_age_s
        self.challenger = challenger  # serves the blueprint's rollout share of users
        self.response = ResponseModel(blueprint)
        self.label_key = blueprint.label.observation

    # -- outcomes --------------------------------------------------------------------------

    def outcomes(self, decisions: Iterable[DecisionEvent]) -> list[ObservationEvent]:
        """What happens after each decision, in event-time order (clean: no injected faults).

        Fixed by ``(seed, decision_id)``: the same decision gets the same outcome wherever it
        was made and in whatever order the decisions come.
        """
        events = [obs for d in decisions for obs in self.outcome(d)[1]]
        return sorted(events, key=lambda e: (e.event_time_ms, e.decision_id))

    def truth(self, decision: DecisionEvent, p_click: float | None = None) -> dict[str, Any]:
        """The ground truth of one decision, as written to ``truth.jsonl``."""
        if p_click is None:
            p_click = self.response.click_probability(decision.features)
        sent = self.was_sent(decision)
        in_window = self.delays.share_within(self.blueprint.label.window_ms)
        row = {
            "decision_id": decision.decision_id,
            "decision": decision.decision,
            "p_click": round(p_click, 6),
            "probability": round(p_click * in_window, 6) if sent else 0.0,
        }
        if decision.arm is not None:
            row["arm"] = decision.arm
        return row

    def was_sent(self, decision: DecisionEvent) -> bool:
        value = decision.decision
        if value is None:
            value = self.blueprint.fallback_decision
        return value not in (0, False)

    def outcome(
        self, decision: DecisionEvent, p_click: float | None = None
    ) -> tuple[bool, list[ObservationEvent]]:
        """(label positive, the observation events) for one decision; see ``outcomes``."""
        rng = random.Random(f"{self.seed}/outcome/{decision.decision_id}")
        if p_click is None:
            p_click = self.response.click_probability(decision.features)
        if not self.was_sent(decision) or rng.random() >= p_click:
            return False, []
        click_ms = decision.event_time_ms + self.delays.draw_ms(rng)
        value: int | float = (
            1 if self.blueprint.label.type == "int" else round(rng.expovariate(0.1), 2)
        )
        events = [ObservationEvent(decision.decision_id, click_ms, {self.label_key: value})]
        if self.label_key != DWELL and rng.random() < 0.7:
            dwell_s = round(rng.lognormvariate(math.log(20), 1.0), 1)
            dwell_ms = click_ms + int(dwell_s * 1000)
            events.append(ObservationEvent(decision.decision_id, dwell_ms, {DWELL: dwell_s}))
        positive = self.blueprint.label.counts(decision.event_time_ms, click_ms)
        return positive, events

    # -- the full product ------------------------------------------------------------------

    def run(self, output: str | Path, decisions: int, days: int, start_ms: int) -> dict:
        """Simulates ``decisions`` decisions over ``days`` days from ``start_ms``; writes the logs,
        ``truth.jsonl`` and ``simulation.json`` under ``output`` and returns the report."""
        if decisions < 1 or days < 1:
            raise ValueError("--decisions and --days must be at least 1")
        output = Path(output)
        population = make_population(self.users or max(100, decisions // 20), self.seed)
        schedule = self._schedule(population, decisions, days, start_ms)
        run = _Run(self, output, {decision_id for _, decision_id, _ in schedule})
        for time_ms, decision_id, features in schedule:
            run.push(time_ms, "decide", (decision_id, features))
        run.play()
        settings = {"decisions_requested": decisions, "days": days, "start": _iso(start_ms)}
        return run.finish({"mode": "simulation", **settings})

    def _schedule(
        self, population: list[User], decisions: int, days: int, start_ms: int
    ) -> list[tuple[int, str, dict]]:
        """(time, decision_id, features) of every decision, in time order."""
        rng = random.Random(f"{self.seed}/decisions")
        hours = list(range(24))
        planned = []
        for day in range(days):
            count = decisions // days + (1 if day < decisions % days else 0)
            chosen_hours = rng.choices(hours, weights=HOURLY_LOAD, k=count)
            for hour in chosen_hours:
                planned.append(
                    (start_ms + day * DAY_MS + hour * 3_600_000 + rng.randrange(3_600_000), day)
                )
        planned.sort()
        schedule, ids = [], set()
        for time_ms, day in planned:
            decision_id = _new_id(rng, ids)
            user = population[rng.randrange(len(population))]
            features = blueprint_features(self.blueprint, user, time_ms, day, rng)
            schedule.append((time_ms, decision_id, features))
        return schedule

    def write_outcomes(
        self, output: str | Path, decisions: Iterable[DecisionEvent], skipped: dict | None = None
    ) -> dict:
        """Writes the outcomes of decisions made elsewhere (``observations-*.jsonl`` through the
        client, ``truth.jsonl``, ``simulation.json``) and returns the report. ``skipped`` counts
        what the caller did not pass on (refused lines, duplicate decisions)."""
        run = _Run(self, Path(output), set(), faults=FaultRates(0, 0, 0))
        for decision in decisions:
            run.outcome_of(decision)
        run.play()
        return run.finish({"mode": "outcomes", "skipped": dict(skipped or {})})


class _Run:
    """One simulation run: an event queue in simulated time, the client, and the tallies."""

    def __init__(
        self,
        sim: Simulator,
        output: Path,
        decision_ids: set[str],
        faults: FaultRates | None = None,
    ):
        self.sim = sim
        self.output = output
        self.faults = faults or sim.faults
        self.clock = SimulatedClock()
        self.sink = JsonLinesSink(output, max_age_s=sim.file_age_s, clock=self.clock)
        self.client = DecisionClient(
            sim.blueprint, self.sink, scorer=sim.scorer, clock=self.clock, challenger=sim.challenger
        )
        self.rng = random.Random(f"{sim.seed}/faults")
        self.decision_ids = decision_ids
        self.queue: list[tuple[int, int, str, Any]] = []
        self.sequence = 0
        self.counts: Counter = Counter()
        self.malformed: dict[str, Counter] = {"decision": Counter(), "observation": Counter()}
        self.truth: list[dict] = []
        self.labels: list[tuple[float, float, bool, bool]] = []  # probability, p_click, sent, label
        self.arms: dict[str, list[float]] = {}  # arm -> [decisions, expected labels, labels]

    def push(self, time_ms: int, action: str, payload: Any) -> None:
        """Queues an action; at equal times, actions run in the order they were queued."""
        self.sequence += 1
        heapq.heappush(self.queue, (time_ms, self.sequence, action, payload))

    def play(self) -> None:
        handlers = {
            "decide": self.decide,
            "observe": self.observe,
            "redeliver": self.redeliver,
            "malformed": self.write_malformed,
            "orphan": self.orphan,
        }
        while self.queue:
            time_ms, _, action, payload = heapq.heappop(self.queue)
            self.clock.now_ms = time_ms
            handlers[action](payload)

    def decide(self, payload: tuple[str, dict]) -> None:
        decision_id, features = payload
        event = self.client.get_decision(decision_id, features).event
        self.maybe_faults(event)
        if self.rng.random() < self.faults.orphan:
            self.push(event.event_time_ms + self.sim.delays.draw_ms(self.rng), "orphan", None)
        self.outcome_of(event)

    def outcome_of(self, decision: DecisionEvent) -> None:
        p_click = self.sim.response.click_probability(decision.features)
        positive, observations = self.sim.outcome(decision, p_click)
        truth = self.sim.truth(decision, p_click)
        self.truth.append(truth)
        sent = self.sim.was_sent(decision)
        self.labels.append((truth["probability"], truth["p_click"], sent, positive))
        self.counts["decisions"] += 1
        self.counts["decisions_sent"] += sent
        self.counts["labels_positive"] += positive
        if decision.arm is not None:
            tally = self.arms.setdefault(decision.arm, [0, 0.0, 0])
            tally[0] += 1
            tally[1] += (
                p_click * self.sim.delays.share_within(self.sim.blueprint.label.window_ms) * sent
            )
            tally[2] += positive
        window_end = decision.event_time_ms + self.sim.blueprint.label.window_ms
        for obs in observations:
            self.push(obs.event_time_ms, "observe", obs)
            self.counts["observations_after_window"] += obs.event_time_ms > window_end
            if self.sim.label_key in obs.observations:
                self.counts["clicks"] += 1
                self.counts["clicks_after_window"] += obs.event_time_ms > window_end

    def observe(self, obs: ObservationEvent) -> None:
        event = self.client.log_observations(obs.decision_id, obs.observations, obs.event_time_ms)
        self.counts["observations"] += 1
        self.maybe_faults(event)

    def maybe_faults(self, event: DecisionEvent | ObservationEvent) -> None:
        """Schedules a re-delivery and/or a malformed line shortly after a logged event."""
        if self.rng.random() < self.faults.duplicate:
            self.push(event.event_time_ms + self.rng.randrange(1000, 120_000), "redeliver", event)
        if self.rng.random() < self.faults.malformed:
            self.push(event.event_time_ms + self.rng.randrange(0, 60_000), "malformed", event)

    def redeliver(self, event: DecisionEvent | ObservationEvent) -> None:
        self.sink.write(event)
        kind = "decisions" if isinstance(event, DecisionEvent) else "observations"
        self.counts[f"duplicate_{kind}_injected"] += 1

    def write_malformed(self, event: DecisionEvent | ObservationEvent) -> None:
        kind = "decision" if isinstance(event, DecisionEvent) else "observation"
        reason, line = malformed_line(event, self.sim.blueprint, self.rng)
        self.sink.write_raw(kind, line)
        self.malformed[kind][reason] += 1
        self.counts[f"malformed_{kind}_lines_injected"] += 1

    def orphan(self, _: None) -> None:
        decision_id = _new_id(self.rng, self.decision_ids)
        value = 1 if self.sim.blueprint.label.type == "int" else 1.0
        self.client.log_observations(decision_id, {self.sim.label_key: value})
        self.counts["orphan_observations_injected"] += 1

    def finish(self, settings: dict) -> dict:
        self.sink.close()
        truth_path = self.output / TRUTH_FILE
        with open(truth_path, "w", encoding="utf-8") as f:
            for row in self.truth:
                f.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")
        count_keys = [
            "decisions", "decisions_sent", "duplicate_decisions_injected", "malformed_decision_lines_injected",
            "observations", "duplicate_observations_injected", "orphan_observations_injected",
            "malformed_observation_lines_injected", "observations_after_window", "clicks",
            "clicks_after_window", "labels_positive",
        ]  # fmt: skip
        counts = {key: int(self.counts[key]) for key in count_keys}
        counts["decision_lines"] = self.sink.lines_written["decision"]
        counts["observation_lines"] = self.sink.lines_written["observation"]
        files = sorted(p.name for p in self.sink.finished_files)
        report = {
            "blueprint": self.sim.blueprint.summary(),
            "seed": self.sim.seed,
            **settings,
            "rates": {
                "duplicate": self.faults.duplicate,
                "orphan": self.faults.orphan,
                "malformed": self.faults.malformed,
            },
            "counts": counts,
            "malformed_by_reason": {k: dict(sorted(v.items())) for k, v in self.malformed.items()},
            "ground_truth": self.ground_truth(),
            "files": {
                "decisions": [n for n in files if n.startswith("decisions-")],
                "observations": [n for n in files if n.startswith("observations-")],
                "truth": TRUTH_FILE,
            },
        }
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        (self.output / REPORT_FILE).write_text(text, encoding="utf-8")
        return report

    def ground_truth(self) -> dict:
        """How well the truth itself separates the simulated labels: a ceiling for a model."""
        label = self.sim.blueprint.label
        sent = [(p_click, positive) for _, p_click, was_sent, positive in self.labels if was_sent]
        return {
            "auc": roc_auc([row[0] for row in self.labels], [row[3] for row in self.labels]),
            "auc_sent": roc_auc([s for s, _ in sent], [y for _, y in sent]),
            "positive_rate": _ratio(sum(row[3] for row in self.labels), len(self.labels)),
            "delay_median_s": self.sim.delays.median_s,
            "delay_sigma": self.sim.delays.sigma,
            "share_within_window": round(self.sim.delays.share_within(label.window_ms), 6),
            **({"arms": self.arm_truth()} if self.arms else {}),
        }

    def arm_truth(self) -> dict:
        """Per rollout arm: its decisions, the true expected label rate per decision (the mean of
        each decision's probability of a positive label, from the hidden truth, before any coin
        is flipped) and the rate the coins gave."""
        return {
            arm: {
                "decisions": n,
                "expected_label_rate": _ratio_f(expected, n),
                "label_rate": _ratio(positives, n),
            }
            for arm, (n, expected, positives) in sorted(self.arms.items())
        }


# ---------------------------------------------------------------------------------------------
# Malformed lines


def malformed_line(
    event: DecisionEvent | ObservationEvent, blueprint: Blueprint, rng: random.Random
) -> tuple[str, str]:
    """(refusal reason the parser must give, the broken line) made from a real event."""
    record = event.to_dict()
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    if isinstance(event, DecisionEvent):
        reason = rng.choice(
            [BAD_JSON, MISSING_FIELD, WRONG_TYPE, BAD_TIME, UNKNOWN_FEATURE, FEATURE_TYPE]
        )
    else:
        reason = rng.choice([BAD_JSON, MISSING_FIELD, WRONG_TYPE, BAD_TIME, LABEL_TYPE])
    if reason == BAD_JSON:
        return reason, text[: len(text) // 2]  # a cut-off object is never valid JSON
    if reason == MISSING_FIELD:
        record.pop(rng.choice(["event_time", "decision_id"]))
    elif reason == WRONG_TYPE:
        record["decision_id"] = rng.randrange(1, 10**6)
    elif reason == BAD_TIME:
        record["event_time"] = rng.choice(
            ["yesterday", "2026-13-45T99:00:00Z", "2026-11-01T12:00:00"]
        )
    elif reason == UNKNOWN_FEATURE:
        record["features"] = {**record["features"], "unexpected_feature": 1}
    elif reason == FEATURE_TYPE:
        feature = rng.choice(blueprint.features)
        wrong = 123 if feature.base_type == "string" else "not a number"
        record["features"] = {**record["features"], feature.name: wrong}
    elif reason == LABEL_TYPE:
        record["observations"] = {**record["observations"], blueprint.label.observation: "yes"}
    return reason, json.dumps(record, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Small helpers


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    positives = sum(1 for y in labels if y)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    order = sorted(range(len(scores)), key=scores.__getitem__)
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1
        rank_sum += average_rank * sum(1 for k in range(i, j + 1) if labels[order[k]])
        i = j + 1
    return round((rank_sum - positives * (positives + 1) / 2) / (positives * negatives), 6)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method; fine for the small means used here."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _unit(text: str, lo: float = 0.0) -> float:
    """A stable number in [lo, 1 - lo) derived from ``text``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return lo + (1 - 2 * lo) * int.from_bytes(digest, "big") / 2.0**64


TASTE_SD = 0.5  # the spread of the users' taste for notifications, on the logit scale
BASE_CLICK_LOGIT = -2.2  # a typical user's click rate, about 10%, before their taste


def _taste(user_id: str) -> float:
    """The user's latent taste: a stable N(0, TASTE_SD^2) draw on the logit scale."""
    return TASTE_SD * NormalDist().inv_cdf(_unit(f"taste/{user_id}", lo=1e-6))


def _click_rate_90d(user_id: str) -> float:
    """The user's click rate on notifications as the product knows it from 90 days of sends:
    a typical user's rate moved by their taste (long enough a history to read it exactly)."""
    return 1.0 / (1.0 + math.exp(-(BASE_CLICK_LOGIT + _taste(user_id))))


def _favourite_topic(user_id: str) -> str:
    topics = sorted(TOPICS)
    return topics[int(_unit(f"favourite/{user_id}") * len(topics))]


def _new_id(rng: random.Random, taken: set[str]) -> str:
    while True:
        decision_id = f"{rng.getrandbits(64):016x}"
        if decision_id not in taken:
            taken.add(decision_id)
            return decision_id


def _cast(value: Any, ftype: str) -> Any:
    base = {"int": int, "float": float, "string": str}[ftype.removesuffix("_list")]
    if ftype.endswith("_list"):
        return [base(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        value = value[0] if value else 0
    return base(value)


def _generic_value(rng: random.Random, ftype: str) -> Any:
    """A value of ``ftype`` for a feature the simulated product knows nothing about."""
    one = {
        "int": lambda: rng.randrange(0, 11),
        "float": lambda: round(rng.gauss(0, 1), 4),
        "string": lambda: f"v{rng.randrange(5)}",
    }[ftype.removesuffix("_list")]
    if ftype.endswith("_list"):
        return [one() for _ in range(rng.randrange(0, 4))]
    return one()


def _generic_effect(name: str, value: Any) -> float:
    """A small effect on the logit for a generic feature, fixed by its name."""
    values = value if isinstance(value, list) else [value]
    if not values:
        return 0.0
    weight = _unit(f"weight/{name}") - 0.5
    total = 0.0
    for v in values:
        if isinstance(v, str):
            total += _unit(f"level/{name}/{v}") - 0.5
        elif isinstance(v, int | float) and not isinstance(v, bool):
            total += weight * math.tanh((v - 5) / 5 if isinstance(v, int) else v)
    return total / len(values)


def _number(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return default


def _numbers(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [max(0.0, _number(v, 0.0)) for v in value]


def _strings(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str)]


def _string(value: Any) -> str | None:
    """A string feature's value; the first element of a string list."""
    strings = _strings(value)
    return strings[0] if strings else None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _ratio_f(part: float, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_start(text: str) -> int:
    """``2026-11-01`` (midnight UTC) or an RFC 3339 time, to epoch milliseconds."""
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return int(day.timestamp() * 1000)
    except ValueError:
        return parse_event_time(text)


def read_decisions(pattern: str, blueprint: Blueprint) -> tuple[list[DecisionEvent], Counter]:
    """The first event of every decision in the files matching ``pattern``, and what was skipped."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ValueError(f"--outcomes_for {pattern!r} matches no files")
    skipped: Counter = Counter()
    first: dict[str, DecisionEvent] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                event = parse_decision_json(line.rstrip("\n"), blueprint)
                if not isinstance(event, DecisionEvent):
                    skipped["refused_lines"] += 1
                    continue
                seen = first.get(event.decision_id)
                if seen is not None:
                    skipped["duplicate_decisions"] += 1
                    if event.event_time_ms >= seen.event_time_ms:
                        continue
                first[event.decision_id] = event
    decisions = sorted(first.values(), key=lambda e: (e.event_time_ms, e.decision_id))
    return decisions, skipped


OUR_FILES = (
    "decisions-*.jsonl",
    "observations-*.jsonl",
    "*.jsonl.inprogress",
    TRUTH_FILE,
    REPORT_FILE,
)


def _prepare_output(output: Path, overwrite: bool) -> None:
    existing = sorted(p for pattern in OUR_FILES for p in output.glob(pattern))
    if existing and not overwrite:
        raise ValueError(
            f"{output} already holds simulator output ({existing[0].name}); "
            "use an empty directory or pass --overwrite"
        )
    for path in existing:
        path.unlink()


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line, like every other error of this command."""

    def error(self, message: str):
        self.exit(2, f"loopline.simulate: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(
        prog="python -m loopline.simulate",
        description="Simulate a product that makes decisions through the Loopline client.",
    )
    parser.add_argument("--blueprint", required=True, help="blueprint YAML file")
    parser.add_argument("--output", required=True, help="directory for the logs")
    parser.add_argument("--decisions", type=int, default=10_000, help="decisions to make")
    parser.add_argument("--days", type=int, default=1, help="days the decisions are spread over")
    parser.add_argument(
        "--start", default="2026-11-01", help="first day (YYYY-MM-DD, UTC) or RFC 3339"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--users", type=int, default=None, help="population size (default decisions/20)"
    )
    parser.add_argument("--duplicate_rate", type=float, default=FaultRates.duplicate)
    parser.add_argument("--orphan_rate", type=float, default=FaultRates.orphan)
    parser.add_argument("--malformed_rate", type=float, default=FaultRates.malformed)
    parser.add_argument(
        "--scorer",
        choices=["fallback", "truth"],
        default="fallback",
        help="decide with the blueprint's fallback, or score with the hidden truth",
    )
    parser.add_argument(
        "--rollout",
        choices=list(SCENARIOS),
        default=None,
        help="score with the truth in production and serve the blueprint's rollout share of "
        "users with a challenger that is truly better, worse or the same (docs/rollout.md)",
    )
    parser.add_argument(
        "--outcomes_for",
        metavar="GLOB",
        default=None,
        help="only simulate outcomes of the decisions in these JSON-lines files",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace earlier simulator output in --output"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        blueprint = load_blueprint(args.blueprint)
        faults = FaultRates(args.duplicate_rate, args.orphan_rate, args.malformed_rate)
        if args.users is not None and args.users < 1:
            raise ValueError("--users must be at least 1")
        sim = Simulator(blueprint, args.seed, faults, users=args.users)
        if args.scorer == "truth":
            sim.scorer = TruthScorer(sim.response)
        if args.rollout:
            sim.scorer, sim.challenger = scenario_scorers(sim.response, args.rollout)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        _prepare_output(output, args.overwrite)
        if args.outcomes_for:
            decisions, skipped = read_decisions(args.outcomes_for, blueprint)
            report = sim.write_outcomes(output, decisions, skipped)
        else:
            report = sim.run(output, args.decisions, args.days, parse_start(args.start))
    except (BlueprintError, ValueError, OSError) as e:
        print(f"loopline.simulate: error: {e}", file=sys.stderr)
        return 2
    _print_summary(report, output, time.monotonic() - started)
    return 0


class TruthScorer:
    """Scores with the hidden truth: an oracle model, to exercise a policy end to end.

    ``transform`` maps the true click probability to the score (the identity by default); a
    strictly increasing one keeps the ranking, so the scorer's AUC on any data is the truth's.
    """

    def __init__(
        self,
        response: ResponseModel,
        model_id: str = "truth",
        transform: Callable[[float], float] | None = None,
    ):
        self.response = response
        self.model_id = model_id
        self.transform = transform

    def __call__(self, features: dict[str, Any]) -> float:
        p = self.response.click_probability(features)
        return p if self.transform is None else self.transform(p)


def _send_more(p: float) -> float:
    """Twice the truth, capped at 1: past the policy's threshold at half the probability."""
    return min(1.0, 2.0 * p)


def _send_less(p: float) -> float:
    """A third of the truth: past the policy's threshold only at three times the probability."""
    return p / 3.0


# Rollout scenarios with a known answer (docs/rollout.md): the challenger's transform of the
# truth. Each ranks decisions exactly as production does (same AUC, so any offline AUC gate
# passes it), but the threshold policy then sends to more or fewer users. A notification that is
# not sent is never clicked, and each extra send is clicked with its positive true probability,
# so sending more truly raises the click rate per decision and sending less truly lowers it.
SCENARIOS = {"better": _send_more, "worse": _send_less, "same": None}


def scenario_scorers(
    response: ResponseModel,
    scenario: str,
    production_id: str = "truth-production",
    challenger_id: str = "truth-challenger",
) -> tuple[TruthScorer, TruthScorer]:
    """(production, challenger) oracle scorers of a rollout scenario: ``better``, ``worse`` or
    ``same`` (the identical scorer under another model id)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"the scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    return (
        TruthScorer(response, production_id),
        TruthScorer(response, challenger_id, SCENARIOS[scenario]),
    )


def _print_summary(report: dict, output: Path, elapsed_s: float) -> None:
    counts, truth = report["counts"], report["ground_truth"]
    files = report["files"]
    print(
        f"wrote {output}: {len(files['decisions'])} decision files, "
        f"{len(files['observations'])} observation files, {TRUTH_FILE}, {REPORT_FILE}"
    )
    for key, value in counts.items():
        print(f"  {key:38s} {value}")
    print(
        f"  ground-truth AUC {truth['auc']} (sent: {truth['auc_sent']}), "
        f"positive rate {truth['positive_rate']}, "
        f"share of clicks within the window {truth['share_within_window']}"
    )
    for arm, figures in truth.get("arms", {}).items():
        print(
            f"  arm {arm}: {figures['decisions']} decisions, true expected label rate "
            f"{figures['expected_label_rate']}, simulated {figures['label_rate']}"
        )
    print(f"  took {elapsed_s:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
