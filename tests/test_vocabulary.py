"""loopline.vocabulary: each closed vocabulary defined once, as strings that files keep."""

import json

import pytest

from loopline.vocabulary import (
    FILE_FORMATS,
    PARSE_FORMATS,
    SCORING_FILE_FORMATS,
    SCORING_INPUT_FORMATS,
    Format,
)


def test_a_format_is_the_string_it_always_was():
    assert Format.AVRO == "avro" and Format("tfrecord") is Format.TFRECORD
    assert (str(Format.JSON), f"{Format.JSON}", json.dumps([Format.JSON])) == (
        "json",
        "json",
        '["json"]',
    )
    assert {"avro": 1}[Format.AVRO] == 1  # hashes as its string: a dict lookup finds it


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="'parquet' is not a valid Format"):
        Format("parquet")


def test_each_step_takes_the_formats_it_took_before():
    assert FILE_FORMATS == ("auto", "json", "avro")
    assert PARSE_FORMATS == ("json", "avro", "record", "pubsub")
    assert SCORING_INPUT_FORMATS == ("json", "avro", "tfrecord", "record")
    assert SCORING_FILE_FORMATS == ("auto", "json", "avro", "tfrecord")


def test_the_steps_import_the_one_definition():
    from pipelines import bulk_score
    from transforms import events, scoring_input, sources

    assert sources.SCORING_FILE_FORMATS is SCORING_FILE_FORMATS and events.FORMATS is PARSE_FORMATS
    assert scoring_input.FORMATS is SCORING_INPUT_FORMATS
    assert bulk_score.INPUT_FORMATS is SCORING_FILE_FORMATS


def test_help_lists_the_formats_as_plain_words():
    from pipelines.bulk_score import BulkScoreOptions
    from pipelines.launch import help_text

    assert "{auto,json,avro,tfrecord}" in help_text(BulkScoreOptions, "bulk_score")
