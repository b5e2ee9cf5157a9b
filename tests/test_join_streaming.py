"""The join on unbounded input: TestStream, sessions per decision_id, late data, redelivery.

A decision's session ends ``window + backward_slack + allowed_lateness`` after its last event;
then its example is emitted once. For one more gap (the TTL) the join remembers the decision:
a redelivered decision is a ``duplicate_decision``, an observation that would have counted is
a ``late_observation``, others ``out_of_window`` or ``duplicate_observation``. After the TTL
the decision_id is forgotten.
"""

from __future__ import annotations

import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from tests.test_join import (
    HOUR,
    MINUTE,
    T0,
    decision,
    expect,
    observation,
    run_join,
    summary,
    timestamped,
)
from transforms.join import (
    DEFAULT,
    LATE_OBSERVATION,
    OBSERVED,
    ORPHAN,
    OUT_OF_WINDOW,
    JoinDecisions,
    classify_decision_group,
)


class Stream:
    """A TestStream of decisions and observations, built step by step in arrival order."""

    def __init__(self, start_ms: int = T0 - HOUR):
        self._stream = test_stream.TestStream(output_tags=["decisions", "observations"])
        self._watermark_ms = start_ms - 1
        self.watermark(start_ms)

    def decisions(self, *events) -> Stream:
        self._stream.add_elements(timestamped(events), tag="decisions")
        return self

    def observations(self, *events) -> Stream:
        self._stream.add_elements(timestamped(events), tag="observations")
        return self

    def watermark(self, ms: int) -> Stream:
        """Advances both inputs' watermark to ``ms`` (ignored unless it moves forward)."""
        if ms <= self._watermark_ms:
            return self
        self._watermark_ms = ms
        for tag in ("decisions", "observations"):
            self._stream.advance_watermark_to(Timestamp(micros=ms * 1000), tag=tag)
        return self

    def run(self, blueprint, check, **join_args):
        """Runs the join on the stream; ``check(outputs)`` adds the assertions. The result."""
        for tag in ("decisions", "observations"):
            self._stream.advance_watermark_to_infinity(tag=tag)
        options = PipelineOptions()
        options.view_as(StandardOptions).streaming = True
        pipeline = beam.Pipeline(options=options)
        streams = pipeline | "Events" >> self._stream
        outputs = (streams["decisions"], streams["observations"]) | "Join" >> JoinDecisions(
            blueprint, **join_args
        )
        check(outputs)
        result = pipeline.run()
        result.wait_until_finish()
        return result


def test_out_of_order_events_join_as_in_batch(blueprint):
    d1, d2 = decision("d1", at=T0), decision("d2", at=T0 + 10 * MINUTE)
    late_click = observation("d2", at=T0 + 20 * MINUTE, click=1)
    early_zero = observation("d1", at=T0 + 5 * MINUTE, click=0)
    (
        Stream()
        .observations(late_click)
        .decisions(d2)
        .watermark(T0 - MINUTE)
        .decisions(d1)
        .observations(early_zero)
        .run(
            blueprint,
            lambda out: expect(out, joined=[("d1", 0, OBSERVED, 1), ("d2", 1, OBSERVED, 1)]),
        )
    )


def test_observation_arriving_before_its_decision_counts(blueprint):
    within_slack = observation("d1", at=T0 - MINUTE)
    (
        Stream()
        .observations(within_slack)
        .watermark(T0 - MINUTE)
        .decisions(decision("d1", at=T0))
        .run(blueprint, lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)]))
    )


def test_observation_past_the_window_before_the_session_closes_is_out_of_window(blueprint):
    past_window = observation("d1", at=T0 + HOUR + 30_000)
    (
        Stream()
        .decisions(decision("d1"))
        .watermark(T0 + HOUR)
        .observations(past_window)
        .run(
            blueprint,
            lambda out: expect(
                out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(OUT_OF_WINDOW, past_window)]
            ),
        )
    )


def test_late_observation_within_allowed_lateness_counts(blueprint):
    # Arrives 5 minutes behind the watermark; the join waits 10 minutes past the window.
    late_click = observation("d1", at=T0 + HOUR)
    (
        Stream()
        .decisions(decision("d1"))
        .watermark(T0 + HOUR + 5 * MINUTE)
        .observations(late_click)
        .run(
            blueprint,
            lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)]),
            allowed_lateness_ms=10 * MINUTE,
        )
    )


def test_observation_after_the_decision_was_emitted_is_a_late_observation(blueprint):
    # Without allowed lateness the session closes at T0 + 1h 2m (window + slack): the decision
    # is emitted with its default label; the click that would have counted arrives after that.
    late_click = observation("d1", at=T0 + HOUR)
    (
        Stream()
        .decisions(decision("d1"))
        .watermark(T0 + HOUR + 5 * MINUTE)
        .observations(late_click)
        .run(
            blueprint,
            lambda out: expect(
                out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(LATE_OBSERVATION, late_click)]
            ),
        )
    )


def test_decision_redelivered_after_it_was_emitted_is_a_duplicate_not_a_second_example(
    blueprint,
):
    first = decision("d1")
    click = observation("d1", at=T0 + MINUTE)
    (
        Stream()
        .decisions(first)
        .observations(click)
        .watermark(T0 + 2 * HOUR)
        .decisions(first)
        .run(
            blueprint,
            lambda out: expect(out, joined=[("d1", 1, OBSERVED, 1)], duplicate_decisions=[first]),
        )
    )


def test_observation_outside_the_window_after_emission_is_out_of_window(blueprint):
    after_window = observation("d1", at=T0 + HOUR + 3 * MINUTE)
    (
        Stream()
        .decisions(decision("d1"))
        .watermark(T0 + HOUR + 4 * MINUTE)
        .observations(after_window)
        .run(
            blueprint,
            lambda out: expect(
                out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(OUT_OF_WINDOW, after_window)]
            ),
        )
    )


def test_observation_redelivered_after_emission_is_a_duplicate(blueprint):
    click = observation("d1", at=T0 + MINUTE)
    (
        Stream()
        .decisions(decision("d1"))
        .observations(click)
        .watermark(T0 + 2 * HOUR)
        .observations(click)
        .run(
            blueprint,
            lambda out: expect(
                out, joined=[("d1", 1, OBSERVED, 1)], duplicate_observations=[click]
            ),
        )
    )


def test_decision_is_forgotten_after_its_ttl(blueprint):
    # The session closes at T0 + 1h 2m and the TTL (one more gap) ends at T0 + 2h 4m: an
    # observation of d1 arriving after that no longer finds it.
    stray = observation("d1", at=T0 + 30 * MINUTE)
    (
        Stream()
        .decisions(decision("d1"))
        .watermark(T0 + 2 * HOUR + 5 * MINUTE)
        .observations(stray)
        .run(
            blueprint,
            lambda out: expect(out, joined=[("d1", 0, DEFAULT, 0)], unmatched=[(ORPHAN, stray)]),
        )
    )


def test_duplicates_across_bundles_are_dropped_once_each(blueprint):
    first, replay = decision("d1", at=T0), decision("d1", at=T0)
    click = observation("d1", at=T0 + MINUTE)
    (
        Stream()
        .decisions(first)
        .observations(click)
        .watermark(T0 + 10 * MINUTE)
        .decisions(replay)
        .observations(click)
        .watermark(T0 + 20 * MINUTE)
        .observations(click)
        .run(
            blueprint,
            lambda out: expect(
                out,
                joined=[("d1", 1, OBSERVED, 1)],
                duplicate_decisions=[replay],
                duplicate_observations=[click, click],
            ),
        )
    )


def test_orphan_observation_is_reported_when_its_session_closes(blueprint):
    stray = observation("d-missing", at=T0)
    Stream().observations(stray).run(
        blueprint, lambda out: expect(out, unmatched=[(ORPHAN, stray)])
    )


# ---------------------------------------------------------------------------------------------
# Batch and streaming agree


def random_events(seed: int, n_decisions: int = 30):
    """Decisions with duplicates, observations in and out of the window, and orphans."""
    rng = random.Random(seed)
    decisions, observations = [], []
    for i in range(n_decisions):
        td = T0 + rng.randrange(0, 6 * HOUR)
        decisions.append(decision(f"d{i}", at=td, model_id=f"m{rng.randrange(3)}"))
        if rng.random() < 0.2:
            decisions.append(
                decision(f"d{i}", at=td + rng.randrange(0, 5 * MINUTE), model_id="replay")
            )
        for _ in range(rng.randrange(0, 4)):
            offset = rng.randrange(-5 * MINUTE, HOUR + 5 * MINUTE)
            observations.append(observation(f"d{i}", at=td + offset, click=rng.randrange(2)))
        if observations and rng.random() < 0.2:
            observations.append(observations[-1])
    for j in range(5):
        observations.append(observation(f"orphan{j}", at=T0 + rng.randrange(0, 6 * HOUR)))
    return decisions, observations


def test_batch_and_streaming_give_the_same_joined_decisions(blueprint):
    lateness = 10 * MINUTE
    decisions, observations = random_events(seed=3)
    # Both pipelines are checked against one expectation, so batch == streaming follows.
    expected = [_full(j) for j in _classify_all(blueprint, decisions, observations)]
    assert len(expected) == 30
    for windowing in ("auto", "session"):  # the global window, and sessions on bounded input
        run_join(
            blueprint,
            decisions,
            observations,
            lambda out: assert_that(
                out.joined | beam.Map(_full), equal_to(expected), label="Batch"
            ),
            windowing=windowing,
        )

    # Arrival order: event time plus a random delay of at most the allowed lateness; the
    # watermark trails the earliest event still to come by the allowed lateness, so some events
    # arrive behind the watermark but none later than the allowed lateness.
    rng = random.Random(4)
    arrivals = sorted(
        [(e.event_time_ms + rng.randrange(lateness), "d", e) for e in decisions]
        + [(e.event_time_ms + rng.randrange(lateness), "o", e) for e in observations],
        key=lambda a: a[0],
    )
    stream = Stream()
    for i in range(0, len(arrivals), 7):
        chunk = arrivals[i : i + 7]
        stream.decisions(*[e for _, kind, e in chunk if kind == "d"])
        stream.observations(*[e for _, kind, e in chunk if kind == "o"])
        remaining = arrivals[i + 7 :]
        if remaining:
            stream.watermark(min(e.event_time_ms for _, _, e in remaining) + lateness)
    stream.run(
        blueprint,
        lambda out: assert_that(
            out.joined | beam.Map(_full), equal_to(expected), label="Streaming"
        ),
        allowed_lateness_ms=lateness,
    )


def _classify_all(blueprint, decisions, observations):
    ids = sorted({e.decision_id for e in decisions})
    return [
        classify_decision_group(
            [d for d in decisions if d.decision_id == i],
            [o for o in observations if o.decision_id == i],
            blueprint.label,
        ).joined
        for i in ids
    ]


def _full(joined):
    return summary(joined) + (
        joined.decision,
        joined.label_delays_ms,
        joined.observation_offsets_ms,
    )
