"""Property tests of the join's accounting: for random event streams the counts reconcile as in
DESIGN.md and every input event lands in exactly one output.

    decisions_in    = examples_written + duplicate_decisions
    observations_in = observations_used + out_of_window + orphan + duplicate_observations

(the rejected counts belong to parsing, which these events never fail), and, from files through
parsing to the span's manifest, that bad bytes and values are counted rejections and never fail
the job.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline.events import DecisionEvent, ObservationEvent
from tests.test_join import FEATURES, MINUTE, T0, run_join
from transforms.events import ParseDecisions, ParseObservations
from transforms.join import (
    METRICS_NAMESPACE,
    OBSERVED,
    ORPHAN,
    OUT_OF_WINDOW,
    JoinDecisions,
    classify_decision_group,
)
from transforms.manifest import MANIFEST
from transforms.sources import ReadEvents
from transforms.span import SpanInputs, WriteSpan

IDS = ["a", "b", "c", "d"]

decisions_strategy = st.builds(
    lambda i, minutes, model: DecisionEvent(
        i, "notify", T0 + minutes * MINUTE, FEATURES, model_id=model
    ),
    st.sampled_from(IDS[:3]),
    st.integers(0, 180),
    st.sampled_from(["m1", "m2"]),
)
observations_strategy = st.builds(
    lambda i, minutes, values: ObservationEvent(i, T0 + minutes * MINUTE, values),
    st.sampled_from(IDS),
    st.integers(-10, 300),
    st.one_of(
        st.fixed_dictionaries({"click": st.sampled_from([0, 1, 2, True, False, 0.5])}),
        st.just({"dwell_seconds": 3.0}),
    ),
)


@st.composite
def event_streams(draw, max_decisions=8, max_observations=14):
    """Random decisions and observations, with exact repeats mixed in."""
    decisions = draw(st.lists(decisions_strategy, max_size=max_decisions))
    observations = draw(st.lists(observations_strategy, max_size=max_observations))
    if decisions:
        decisions += draw(st.lists(st.sampled_from(decisions), max_size=3))
    if observations:
        observations += draw(st.lists(st.sampled_from(observations), max_size=4))
    order = draw(st.randoms(use_true_random=False))
    order.shuffle(decisions)
    order.shuffle(observations)
    return decisions, observations


def classify_all(label, decisions, observations):
    """classify_decision_group over every decision_id, as the pipeline does."""
    by_id = defaultdict(lambda: ([], []))
    for d in decisions:
        by_id[d.decision_id][0].append(d)
    for o in observations:
        by_id[o.decision_id][1].append(o)
    return {i: classify_decision_group(ds, os_, label) for i, (ds, os_) in sorted(by_id.items())}


def canon(events):
    return Counter(e.to_json() for e in events)


@settings(max_examples=300, deadline=None)
@given(event_streams())
def test_classification_accounts_for_every_event_exactly_once(blueprint, stream):
    decisions, observations = stream
    label = blueprint.label
    outcomes = classify_all(label, decisions, observations)

    joined = [o.joined for o in outcomes.values() if o.joined is not None]
    duplicate_decisions = [d for o in outcomes.values() for d in o.duplicate_decisions]
    duplicate_observations = [x for o in outcomes.values() for x in o.duplicate_observations]
    unmatched = [u for o in outcomes.values() for u in o.unmatched]

    # decisions_in = examples_written + duplicate_decisions, and as multisets.
    assert len(decisions) == len(joined) + len(duplicate_decisions)
    assert canon(decisions) == canon([j.decision for j in joined] + duplicate_decisions)
    assert len({j.decision.decision_id for j in joined}) == len(joined)

    # observations_in = used + out_of_window + orphan + duplicates.
    used = sum(j.observations_used for j in joined)
    assert len(observations) == used + len(unmatched) + len(duplicate_observations)
    left = canon(observations) - canon([u.event for u in unmatched] + duplicate_observations)
    assert sum(left.values()) == used  # the rest are exactly the counted observations

    kept = {j.decision.decision_id: j.decision for j in joined}
    for u in unmatched:
        if u.reason == ORPHAN:
            assert u.event.decision_id not in kept
        else:
            assert u.reason == OUT_OF_WINDOW
            assert not label.counts(kept[u.event.decision_id].event_time_ms, u.event.event_time_ms)
    for j in joined:
        assert j.decision.event_time_ms == min(
            d.event_time_ms for d in decisions if d.decision_id == j.decision.decision_id
        )
        assert len(j.label_delays_ms) == j.observations_used
        assert all(
            -label.backward_slack_ms <= delay <= label.window_ms for delay in j.label_delays_ms
        )
        assert (j.join_status == OBSERVED) == any(
            "click" in o.observations
            for o in observations
            if o.decision_id == j.decision.decision_id
            and label.counts(j.decision.event_time_ms, o.event_time_ms)
        )


@settings(max_examples=150, deadline=None)
@given(event_streams(), st.randoms(use_true_random=False))
def test_classification_does_not_depend_on_arrival_order(blueprint, stream, rng):
    decisions, observations = stream
    shuffled_d, shuffled_o = list(decisions), list(observations)
    rng.shuffle(shuffled_d)
    rng.shuffle(shuffled_o)
    for aggregation in ("max", "earliest", "latest", "mean"):
        label = dataclasses.replace(blueprint.label, aggregation=aggregation, type="float")
        assert classify_all(label, decisions, observations) == classify_all(
            label, shuffled_d, shuffled_o
        )


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(event_streams(max_decisions=6, max_observations=10))
def test_pipeline_counters_reconcile_and_outputs_cover_every_event(blueprint, stream):
    decisions, observations = stream
    outcomes = classify_all(blueprint.label, decisions, observations)
    expected_unmatched = sorted(
        (u.reason, u.event.to_json()) for o in outcomes.values() for u in o.unmatched
    )

    def check(out):
        assert_that(
            out.joined | "DecisionJson" >> beam.Map(lambda j: j.decision.to_json()),
            equal_to([o.joined.decision.to_json() for o in outcomes.values() if o.joined]),
            label="Joined",
        )
        assert_that(
            out.unmatched | "UnmatchedJson" >> beam.Map(lambda u: (u.reason, u.event.to_json())),
            equal_to(expected_unmatched),
            label="Unmatched",
        )
        assert_that(
            out.duplicate_decisions | "DupDecisionJson" >> beam.Map(lambda d: d.to_json()),
            equal_to([d.to_json() for o in outcomes.values() for d in o.duplicate_decisions]),
            label="DuplicateDecisions",
        )
        assert_that(
            out.duplicate_observations | "DupObservationJson" >> beam.Map(lambda x: x.to_json()),
            equal_to([x.to_json() for o in outcomes.values() for x in o.duplicate_observations]),
            label="DuplicateObservations",
        )

    result = run_join(blueprint, decisions, observations, check)
    c = Counter(
        {
            m.key.metric.name: m.committed
            for m in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))[
                "counters"
            ]
        }
    )
    assert c["decisions_in"] == len(decisions) == c["examples_written"] + c["duplicate_decisions"]
    assert c["examples_written"] == c["examples_observed"] + c["examples_default"]
    assert (
        c["observations_in"]
        == len(observations)
        == (
            c["observations_used"]
            + c["observations_out_of_window"]
            + c["observations_orphan"]
            + c["duplicate_observations"]
        )
    )
    assert c["observations_orphan"] + c["observations_out_of_window"] == len(expected_unmatched)


# --- Bad bytes and values through the join, from files to manifest ---------------------------

INT64 = 2**63
FLOAT32_MAX = 3.4028234663852886e38


def good_decision_line(decision_id: str, **changes) -> bytes:
    obj = {**DecisionEvent(decision_id, "notify", T0, FEATURES).to_dict(), **changes}
    return json.dumps(obj).encode()


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# (line maker taking a fresh decision id, whether the join must refuse it)
corruptions = st.one_of(
    st.just((lambda i: good_decision_line(i), False)),
    st.just((lambda i: b"\xef\xbb\xbf" + good_decision_line(i), False)),
    st.binary(min_size=1, max_size=30)
    .filter(lambda b: b"\n" not in b and b"\r" not in b and not_utf8(b))
    .map(lambda b: (lambda i: good_decision_line(i).replace(b"notify", b, 1), True)),
    (st.integers(max_value=-INT64 - 1) | st.integers(min_value=INT64)).map(
        lambda v: (lambda i: good_decision_line(i, features={**FEATURES, "tenure_days": v}), True)
    ),
    (
        st.floats(min_value=FLOAT32_MAX, exclude_min=True)
        | st.sampled_from([float("nan"), float("-inf"), -1e39])
    ).map(
        lambda v: (
            lambda i: good_decision_line(i, features={**FEATURES, "open_rate_30d": v}),
            True,
        )
    ),
    (st.integers(max_value=946_684_799_999) | st.integers(min_value=4_102_444_800_000)).map(
        lambda t: (lambda i: good_decision_line(i, event_time=t), True)
    ),
    st.integers(min_value=2**64).map(
        lambda v: (lambda i: good_decision_line(i, propensity=v), True)
    ),
)


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(corruptions, min_size=1, max_size=12))
def test_bad_bytes_and_values_from_files_are_counted_rejections_and_the_span_reconciles(
    blueprint, lines
):
    made = [(make(f"d{n}"), bad) for n, (make, bad) in enumerate(lines)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "decisions.jsonl").write_bytes(b"\n".join(line for line, _ in made) + b"\n")
        (root / "observations.jsonl").write_bytes(b"")
        output = root / "span"
        with beam.Pipeline() as pipeline:
            sources = [
                ReadEvents(kind, pattern=str(root / f"{kind}s.jsonl"))
                for kind in ("decision", "observation")
            ]
            raw = [pipeline | f"Read[{s.kind}]" >> s for s in sources]
            parsed = [
                raw[0] | "ParseDecisions" >> ParseDecisions(blueprint),
                raw[1] | "ParseObservations" >> ParseObservations(blueprint),
            ]
            join = (parsed[0].events, parsed[1].events) | JoinDecisions(blueprint)
            inputs = SpanInputs.from_join(join, parsed[0].rejected, parsed[1].rejected, *raw)
            _ = inputs | WriteSpan(str(output), blueprint, b"test-key")
        manifest = json.loads((output / MANIFEST).read_text())
    bad = sum(is_bad for _, is_bad in made)
    assert manifest["reconciles"] is True
    assert manifest["decisions_in"] == len(made)
    assert manifest["rejected_decisions"] == bad
    assert manifest["examples_written"] == len(made) - bad
