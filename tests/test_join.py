"""The join's semantic rules (DESIGN.md, "Join semantics"), one test per rule, on TestPipeline.

The example blueprint's label is ``clicked = max(click)`` over ``[td - 2m, td + 1h]``, default 0.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.events import DecisionEvent, ObservationEvent
from transforms.join import (
    DEFAULT,
    METRICS_NAMESPACE,
    OBSERVED,
    ORPHAN,
    OUT_OF_WINDOW,
    JoinDecisions,
    ObservationRange,
    classify_decision_group,
    session_gap_ms,
)

T0 = 1_793_534_400_000  # 2026-11-01T12:00:00Z
MINUTE = 60_000
HOUR = 60 * MINUTE

FEATURES = {
    "user_id": "u-1",
    "tenure_days": 120,
    "country": "KR",
    "platform": "ios",
    "hour_of_day": 12,
    "sends_last_7d": 3,
    "open_rate_30d": 0.25,
    "recent_clicks": [1.0, 0.0, 2.0],
    "topics": ["sports"],
    "click_rate_90d": 0.12,
    "favourite_topic": "sports",
    "favourite_topic_match": 1,
    "email": "a@example.com",
}


def decision(decision_id: str = "d1", at: int = T0, **overrides) -> DecisionEvent:
    """A valid notify decision at epoch ms ``at``; ``overrides`` replace fields or features."""
    features = {**FEATURES, **overrides.pop("features", {})}
    return DecisionEvent(decision_id, "notify", at, features, **overrides)


def observation(decision_id: str = "d1", at: int = T0, **observations) -> ObservationEvent:
    return ObservationEvent(decision_id, at, observations or {"click": 1})


def with_label(blueprint, **changes):
    """The blueprint with its label changed (aggregation, type, window_ms, ...)."""
    return dataclasses.replace(blueprint, label=dataclasses.replace(blueprint.label, **changes))


def timestamped(events):
    return [TimestampedValue(e, Timestamp(micros=e.event_time_ms * 1000)) for e in events]


def summary(joined):
    """The parts of a JoinedDecision a rule is about."""
    return (joined.decision.decision_id, joined.label, joined.join_status, joined.observations_used)


def run_join(blueprint, decisions, observations, check, **join_args):
    """Runs JoinDecisions on Create'd events; ``check(outputs)`` adds the assertions."""
    pipeline = test_pipeline.TestPipeline()
    d = pipeline | "Decisions" >> beam.Create(timestamped(decisions))
    o = pipeline | "Observations" >> beam.Create(timestamped(observations))
    outputs = (d, o) | "Join" >> JoinDecisions(blueprint, **join_args)
    check(outputs)
    result = pipeline.run()
    result.wait_until_finish()
    return result


def expect(
    outputs,
    joined=(),
    unmatched=(),
    duplicate_decisions=(),
    duplicate_observations=(),
    out_of_range=(),
):
    assert_that(
        outputs.joined | "Summarise" >> beam.Map(summary), equal_to(list(joined)), label="Joined"
    )
    assert_that(
        outputs.unmatched | "Unmatched" >> beam.Map(lambda u: (u.reason, u.event)),
        equal_to(list(unmatched)),
        label="CheckUnmatched",
    )
    assert_that(
        outputs.duplicate_decisions, equal_to(list(duplicate_decisions)), label="DuplicateDecisions"
    )
    assert_that(
        outputs.duplicate_observations, equal_to(list(duplicate_observations)), label="DuplicateObs"
    )
    assert_that(outputs.out_of_range, equal_to(list(out_of_range)), label="OutOfRange")


# ---------------------------------------------------------------------------------------------
# Day boundaries: the span's own observation range

DAY = 24 * HOUR
DAY_START = T0 - 12 * HOUR  # 2026-11-01T00:00:00Z
ONE_DAY = ObservationRange(DAY_START, DAY_START + DAY)


def test_orphan_after_the_range_is_out_of_range_not_an_orphan(blueprint):
    next_days = observation("d-next", at=DAY_START + DAY + 10 * MINUTE)
    run_join(
        blueprint,
        [],
        [next_days],
        lambda out: expect(out, out_of_range=[next_days]),
        observation_range=ONE_DAY,
    )


def test_orphan_inside_the_range_is_still_an_orphan(blueprint):
    stray = observation("nobody", at=DAY_START + DAY - 1)
    run_join(
        blueprint,
        [],
        [stray],
        lambda out: expect(out, unmatched=[(ORPHAN, stray)]),
        observation_range=ONE_DAY,
    )


def test_range_start_is_inclusive_and_end_exclusive(blueprint):
    first, after = observation("a", at=DAY_START), observation("b", at=DAY_START + DAY)
    before = observation("c", at=DAY_START - 1)
    run_join(
        blueprint,
        [],
        [first, after, before],
        lambda out: expect(out, unmatched=[(ORPHAN, first)], out_of_range=[after, before]),
        observation_range=ONE_DAY,
    )


def test_observation_of_a_decision_here_counts_after_the_range_ends(blueprint):
    late_decision = decision("d-late", at=DAY_START + DAY - 5 * MINUTE)
    next_day_click = observation("d-late", at=DAY_START + DAY + 20 * MINUTE)
    run_join(
        blueprint,
        [late_decision],
        [next_day_click],
        lambda out: expect(out, joined=[("d-late", 1, OBSERVED, 1)]),
        observation_range=ONE_DAY,
    )


# ---------------------------------------------------------------------------------------------
# Label window


def test_observation_at_the_window_end_counts(blueprint):
    at_end = observation(at=T0 + HOUR)
    run_join(
        blueprint, [decision()], [at_end], lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)])
    )


def test_observation_after_window_is_out_of_window(blueprint):
    late = observation(at=T0 + HOUR + 1)
    run_join(
        blueprint,
        [decision()],
        [late],
        lambda out: expect(out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(OUT_OF_WINDOW, late)]),
    )


def test_observation_within_backward_slack_counts(blueprint):
    early = observation(at=T0 - 2 * MINUTE)
    run_join(
        blueprint, [decision()], [early], lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)])
    )


def test_observation_before_backward_slack_is_out_of_window(blueprint):
    too_early = observation(at=T0 - 2 * MINUTE - 1)
    run_join(
        blueprint,
        [decision()],
        [too_early],
        lambda out: expect(
            out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(OUT_OF_WINDOW, too_early)]
        ),
    )


def test_only_observations_in_window_shape_the_label(blueprint):
    # max(click) inside the window is 0; the 1 outside must not leak into the label.
    inside = observation(at=T0 + MINUTE, click=0)
    outside = observation(at=T0 + 2 * HOUR, click=1)
    run_join(
        blueprint,
        [decision()],
        [inside, outside],
        lambda out: expect(
            out, joined=[("d1", 0, OBSERVED, 1)], unmatched=[(OUT_OF_WINDOW, outside)]
        ),
    )


# ---------------------------------------------------------------------------------------------
# Default label, orphans


def test_decision_without_observations_gets_default_label(blueprint):
    bp = with_label(blueprint, default=7)
    run_join(bp, [decision()], [], lambda out: expect(out, joined=[("d1", 7, DEFAULT, 0)]))


def test_observation_without_label_key_counts_but_leaves_default_label(blueprint):
    dwell = observation(at=T0 + MINUTE, dwell_seconds=12.5)
    run_join(
        blueprint, [decision()], [dwell], lambda out: expect(out, joined=[("d1", 0, DEFAULT, 1)])
    )


def test_observation_without_decision_is_orphan(blueprint):
    stray = observation("d-missing", at=T0)
    run_join(
        blueprint,
        [decision()],
        [stray],
        lambda out: expect(out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(ORPHAN, stray)]),
    )


# ---------------------------------------------------------------------------------------------
# Aggregations


CLICKS = [(T0 + 3 * MINUTE, 2), (T0 + MINUTE, 5), (T0 + 2 * MINUTE, 1)]


@pytest.mark.parametrize(
    "aggregation, label_type, expected",
    [
        ("sum", "int", 8),
        ("max", "int", 5),
        ("min", "int", 1),
        ("mean", "float", 8 / 3),
        ("count", "int", 3),
        ("earliest", "int", 5),
        ("latest", "int", 2),
    ],
)
def test_each_aggregation_computes_its_label(blueprint, aggregation, label_type, expected):
    bp = with_label(blueprint, aggregation=aggregation, type=label_type)
    observations = [observation(at=t, click=v) for t, v in CLICKS]
    run_join(
        bp,
        [decision()],
        observations,
        lambda out: expect(out, joined=[("d1", expected, OBSERVED, 3)]),
    )


def test_bools_count_as_zero_and_one(blueprint):
    bp = with_label(blueprint, aggregation="sum")
    observations = [observation(at=T0 + i, click=v) for i, v in enumerate([True, True, False])]
    run_join(
        bp, [decision()], observations, lambda out: expect(out, joined=[("d1", 2, OBSERVED, 3)])
    )


def test_int_label_is_rounded_and_float_label_kept(blueprint):
    observations = [observation(at=T0 + 1, click=0.75)]
    run_join(
        blueprint,
        [decision()],
        observations,
        lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)]),
    )
    floats = with_label(blueprint, type="float")
    outcome = classify_decision_group([decision()], observations, floats.label)
    assert outcome.joined.label == 0.75 and isinstance(outcome.joined.label, float)


def test_earliest_and_latest_break_ties_by_canonical_json_not_arrival_order(blueprint):
    same_time = [observation(at=T0 + MINUTE, click=3), observation(at=T0 + MINUTE, click=1)]
    earliest = with_label(blueprint, aggregation="earliest").label
    latest = with_label(blueprint, aggregation="latest").label
    for order in (same_time, same_time[::-1]):
        # {"click":1} sorts before {"click":3}: earliest takes the first, latest the last.
        assert classify_decision_group([decision()], order, earliest).joined.label == 1
        assert classify_decision_group([decision()], order, latest).joined.label == 3


def test_custom_label_fn_replaces_the_named_aggregation(blueprint):
    def dwell_over_ten_seconds(decision_event, counted):
        dwell = sum(o.observations.get("dwell_seconds", 0) for o in counted)
        return None if not counted else int(dwell > 10)

    observations = [
        observation("d1", at=T0 + MINUTE, dwell_seconds=6.0),
        observation("d1", at=T0 + 2 * MINUTE, dwell_seconds=6.0),
        observation("d2", at=T0 + MINUTE, dwell_seconds=3.0),
    ]
    run_join(
        blueprint,
        [decision("d1"), decision("d2"), decision("d3")],
        observations,
        lambda out: expect(
            out,
            joined=[("d1", 1, OBSERVED, 2), ("d2", 0, OBSERVED, 1), ("d3", 0, DEFAULT, 0)],
        ),
        label_fn=dwell_over_ten_seconds,
    )


def test_custom_label_fn_sees_only_counted_observations_in_event_time_order(blueprint):
    seen = []

    def record(decision_event, counted):
        seen.append([o.event_time_ms for o in counted])
        return len(counted)

    observations = [observation(at=T0 + 3), observation(at=T0 + 2 * HOUR), observation(at=T0 + 1)]
    outcome = classify_decision_group([decision()], observations, blueprint.label, record)
    assert seen == [[T0 + 1, T0 + 3]]
    assert outcome.joined.label == 2


def test_custom_label_fn_returning_a_non_number_fails_loudly(blueprint):
    with pytest.raises(TypeError, match="label 'clicked' must be a finite number, got 'yes'"):
        classify_decision_group(
            [decision()], [observation()], blueprint.label, lambda d, obs: "yes"
        )


# ---------------------------------------------------------------------------------------------
# Duplicates


def test_repeated_decision_keeps_the_earliest(blueprint):
    first = decision(at=T0, model_id="m-1")
    later = decision(at=T0 + MINUTE, model_id="m-2")
    pipeline_check = lambda out: (  # noqa: E731
        expect(out, joined=[("d1", 1, OBSERVED, 1)], duplicate_decisions=[later]),
        assert_that(
            out.joined | beam.Map(lambda j: j.decision), equal_to([first]), label="KeptEarliest"
        ),
    )
    # The observation at T0 - 1 min is within the slack of the first decision only.
    run_join(blueprint, [later, first], [observation(at=T0 - MINUTE)], pipeline_check)


def test_decision_tie_is_broken_deterministically(blueprint):
    a = decision(at=T0, model_id="a")
    b = decision(at=T0, model_id="b")
    kept = [
        classify_decision_group(order, [], blueprint.label).joined.decision
        for order in ([a, b], [b, a])
    ]
    assert kept == [a, a]  # the smaller canonical JSON, whatever the arrival order
    run_join(
        blueprint,
        [b, a],
        [],
        lambda out: (
            expect(out, joined=[("d1", 0, DEFAULT, 0)], duplicate_decisions=[b]),
            assert_that(
                out.joined | beam.Map(lambda j: j.decision.model_id), equal_to(["a"]), label="Kept"
            ),
        ),
    )


def test_exact_repeat_of_an_observation_is_a_duplicate(blueprint):
    bp = with_label(blueprint, aggregation="sum")
    click = observation(at=T0 + MINUTE, click=1)
    same_time_other_value = observation(at=T0 + MINUTE, click=2)
    run_join(
        bp,
        [decision()],
        [click, click, same_time_other_value, click],
        lambda out: expect(
            out, joined=[("d1", 3, OBSERVED, 2)], duplicate_observations=[click, click]
        ),
    )


def test_repeated_orphan_observation_is_a_duplicate_not_a_second_orphan(blueprint):
    stray = observation("d-missing")
    run_join(
        blueprint,
        [],
        [stray, stray],
        lambda out: expect(out, unmatched=[(ORPHAN, stray)], duplicate_observations=[stray]),
    )


# ---------------------------------------------------------------------------------------------
# Offsets, counters, configuration


def test_joined_decision_carries_label_delays_and_all_offsets(blueprint):
    observations = [
        observation(at=T0 + 5 * MINUTE),
        observation(at=T0 - MINUTE),
        observation(at=T0 + 3 * HOUR),
    ]
    joined = classify_decision_group([decision()], observations, blueprint.label).joined
    assert joined.label_delays_ms == (-MINUTE, 5 * MINUTE)
    assert joined.observation_offsets_ms == (-MINUTE, 5 * MINUTE, 3 * HOUR)


def test_counters_report_every_manifest_count(blueprint):
    decisions = [decision("d1"), decision("d1", at=T0 + 1), decision("d2")]
    click = observation("d1", at=T0 + MINUTE)
    observations = [click, click, observation("d1", at=T0 + 2 * HOUR), observation("d9")]
    observations.append(observation("d8", at=DAY_START + DAY))  # the next day's
    result = run_join(
        blueprint, decisions, observations, lambda out: None, observation_range=ONE_DAY
    )
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))[
            "counters"
        ]
    }
    assert counters == {
        "decisions_in": 3,
        "observations_in": 5,
        "examples_written": 2,
        "examples_observed": 1,
        "examples_default": 1,
        "duplicate_decisions": 1,
        "duplicate_observations": 1,
        "observations_used": 1,
        "observations_out_of_window": 1,
        "observations_orphan": 1,
        "observations_out_of_range": 1,
    }


def test_session_windowing_in_batch_gives_the_same_joined_decisions(blueprint):
    decisions = [
        decision("d1"),
        decision("d2", at=T0 + 5 * HOUR),
        decision("d2", at=T0 + 5 * HOUR + 1),
    ]
    observations = [observation("d1", at=T0 + HOUR), observation("d2", at=T0 + 5 * HOUR - MINUTE)]
    run_join(
        blueprint,
        decisions,
        observations,
        lambda out: expect(
            out,
            joined=[("d1", 1, OBSERVED, 1), ("d2", 1, OBSERVED, 1)],
            duplicate_decisions=[decisions[2]],
        ),
        windowing="session",
    )


def test_session_gap_covers_window_slack_and_lateness(blueprint):
    assert session_gap_ms(blueprint) == HOUR + 2 * MINUTE + 1
    assert session_gap_ms(blueprint, allowed_lateness_ms=10 * MINUTE) == HOUR + 12 * MINUTE + 1


@pytest.mark.parametrize(
    "args, problem",
    [
        ({"windowing": "fixed"}, "windowing must be one of"),
        ({"allowed_lateness_ms": -1}, "allowed_lateness_ms must be a non-negative integer"),
        ({"label_fn": "max"}, "label_fn must be callable"),
    ],
)
def test_misconfiguration_fails_at_construction(blueprint, args, problem):
    with pytest.raises(ValueError, match=problem):
        JoinDecisions(blueprint, **args)
