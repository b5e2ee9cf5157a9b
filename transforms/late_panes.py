"""Re-timestamping what the streaming join emits late, so an output window still counts it.

A fixed output window drops elements behind the watermark. Two kinds of the join's outputs can
be: a late pane of the join (``CatchUpLatePanes``) and a dead letter that keeps its message's
old event time (``DelayTimestamps``). Both are moved forward by a known bound, never backward,
so they land, counted, in a still open output window instead of being dropped.

    >>> late_safe = joined | beam.ParDo(CatchUpLatePanes(session_gap_ms(blueprint, lateness)))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window
from apache_beam.utils.windowed_value import PaneInfoTiming

from transforms.manifest import COUNTER_NAMESPACE, LATE_JOIN_OUTPUTS_COUNTER


class DelayTimestamps(beam.DoFn):
    """Moves each element's timestamp ``delay_ms`` later (never earlier: no late data made).

    A dead letter keeps its message's event time; shifted by the allowed lateness it is on time
    for its output window whenever its message was within the allowed lateness.
    """

    def __init__(self, delay_ms: int):
        self.delay = beam_window.Duration(micros=delay_ms * 1000)

    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam) -> Iterable[Any]:
        yield beam_window.TimestampedValue(element, timestamp + self.delay)


class CatchUpLatePanes(beam.DoFn):
    """Moves an element of a late join pane ``delay_ms`` later; on-time panes pass unchanged.

    A late pane of the streaming join (an event that arrived after its decision's session fired)
    is timestamped at its session's end, which the watermark has passed, so its output window
    would drop it as late. The join accepts such an event only while the watermark is within
    its own allowed lateness (the session gap) of that end, so moved by the gap its timestamp
    is at or past the watermark: it lands, counted, in a still open output window.
    """

    def __init__(self, delay_ms: int):
        self.delay = beam_window.Duration(micros=delay_ms * 1000)
        self.late = Metrics.counter(COUNTER_NAMESPACE, LATE_JOIN_OUTPUTS_COUNTER)

    def process(
        self,
        element: Any,
        timestamp: Any = beam.DoFn.TimestampParam,
        pane: Any = beam.DoFn.PaneInfoParam,
    ) -> Iterable[Any]:
        if pane is not None and pane.timing == PaneInfoTiming.LATE:
            self.late.inc()
            yield beam_window.TimestampedValue(element, timestamp + self.delay)
        else:
            yield element
