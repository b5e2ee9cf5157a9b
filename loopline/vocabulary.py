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
    "SCORING_FILE_FORMATS",
    "SCORING_INPUT_FORMATS",
    "Format",
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
