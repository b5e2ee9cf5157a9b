"""Loopline's closed vocabularies, each defined once as a ``str`` enum.

A member is a ``str`` equal to its value, and prints as it: flags, manifests and dead letters
keep the strings they always had (``Format.AVRO == "avro"``, ``f"{Format.AVRO}"`` is
``avro``), while the code names each word once. Python 3.10 has no ``enum.StrEnum``;
``Vocabulary`` is that.

    >>> Format("avro") is Format.AVRO
    True
    >>> ", ".join(FILE_FORMATS)
    'auto, json, avro'
"""

from __future__ import annotations

import enum

__all__ = [
    "FILE_FORMATS",
    "PARSE_FORMATS",
    "PARSE_REASONS",
    "SCORING_FILE_FORMATS",
    "SCORING_INPUT_FORMATS",
    "Format",
    "JoinStatus",
    "Reason",
    "Unmatched",
    "Vocabulary",
]


class Vocabulary(str, enum.Enum):
    """A word of a closed vocabulary: a ``str`` equal to (and printed as) its value."""

    def __str__(self) -> str:
        return self.value


class Format(Vocabulary):
    """How input events are encoded, wherever a pipeline reads them."""

    AUTO = "auto"  # by the file name's extension
    JSON = "json"  # JSON lines: one event per line, read as bytes
    AVRO = "avro"  # Avro files, read with fastavro
    RECORD = "record"  # already-decoded dicts (BigQuery rows, Avro records)
    PUBSUB = "pubsub"  # Pub/Sub messages (event time as an attribute)
    TFRECORD = "tfrecord"  # the join's tf.Example TFRecords (scoring reads them)


# The formats each step takes.
FILE_FORMATS = (Format.AUTO, Format.JSON, Format.AVRO)  # files the join reads (--format)
PARSE_FORMATS = (Format.JSON, Format.AVRO, Format.RECORD, Format.PUBSUB)  # ParseDecisions
SCORING_INPUT_FORMATS = (Format.JSON, Format.AVRO, Format.TFRECORD, Format.RECORD)
SCORING_FILE_FORMATS = (Format.AUTO, Format.JSON, Format.AVRO, Format.TFRECORD)  # bulk_score


class Reason(Vocabulary):
    """Why an input or a row became a dead letter: ``reason`` in the join's ``rejected/``,
    scoring's ``failed/`` and the monitor's refused score rows (DESIGN.md, "Join semantics")."""

    # An input that cannot become an event (loopline.events' parsers, every step that reads).
    BAD_JSON = "bad_json"  # not UTF-8, not JSON, or nested too deep
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_TIME = "bad_time"  # unparsable, or outside the accepted event-time range
    UNKNOWN_FEATURE = "unknown_feature"
    MISSING_FEATURE = "missing_feature"
    FEATURE_TYPE = "feature_type"  # not the blueprint's type, or out of its range
    WRONG_DECISION_TYPE = "wrong_decision_type"
    LABEL_TYPE = "label_type"
    BAD_AVRO = "bad_avro"
    # Read, but not where or when a step can use it.
    INTERNAL_ERROR = "internal_error"  # the parser itself failed: kept, never a crash
    LATE = "late"  # streaming: behind the watermark by more than the allowed lateness
    # A parsed decision that could not be scored (bulk scoring).
    ENCODE_FAILED = "encode_failed"
    INFERENCE_FAILED = "inference_failed"
    MISSING_DECISION_ID = "missing_decision_id"  # a TFRecord example without one
    BAD_EXAMPLE = "bad_example"  # a TFRecord record that is not a tf.Example


# What an event's validation refuses an input for (the members up to BAD_AVRO).
PARSE_REASONS = tuple(Reason)[: list(Reason).index(Reason.BAD_AVRO) + 1]


class JoinStatus(Vocabulary):
    """An example's ``join_status``: how its label was found."""

    OBSERVED = "observed"  # from observations counted in the label window
    DEFAULT = "default"  # none was: the blueprint's default label


class Unmatched(Vocabulary):
    """Why an observation taught nothing (``unmatched_observations/``; ``out_of_range`` ones are
    counted only: they belong to another run's span)."""

    ORPHAN = "orphan"  # no decision with its decision_id
    OUT_OF_WINDOW = "out_of_window"  # outside its decision's label window
    LATE_OBSERVATION = "late_observation"  # streaming: the example was already written
    OUT_OF_RANGE = "out_of_range"  # outside --observations_from/--observations_until
