"""loopline.vocabulary: each closed vocabulary defined once, as strings that files keep."""

import json

import pytest

from loopline.vocabulary import (
    FILE_FORMATS,
    PARSE_FORMATS,
    PARSE_REASONS,
    SCORING_FILE_FORMATS,
    SCORING_INPUT_FORMATS,
    Format,
    JoinStatus,
    Reason,
    Unmatched,
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


def test_reasons_and_statuses_keep_the_words_the_outputs_carry():
    assert [str(r) for r in PARSE_REASONS] == [
        "bad_json", "not_an_object", "missing_field", "wrong_type", "bad_time",
        "unknown_feature", "missing_feature", "feature_type", "wrong_decision_type",
        "label_type", "bad_avro",
    ]  # fmt: skip
    others = [r for r in Reason if r not in PARSE_REASONS]
    assert others == [
        "internal_error", "late",
        "encode_failed", "inference_failed", "missing_decision_id", "bad_example",
    ]  # fmt: skip
    assert list(JoinStatus) == ["observed", "default"]
    assert list(Unmatched) == ["orphan", "out_of_window", "late_observation", "out_of_range"]
    assert JoinStatus.DEFAULT.encode() == b"default"  # the examples' join_status bytes


def test_every_step_names_reasons_and_statuses_from_the_one_definition():
    from loopline import events
    from transforms import join, score_rows, scoring_failures

    assert events.REASONS is PARSE_REASONS and events.BAD_AVRO is Reason.BAD_AVRO
    assert score_rows.SCORE_BAD_TIME is events.BAD_TIME is Reason.BAD_TIME
    assert scoring_failures.INFERENCE_FAILED is Reason.INFERENCE_FAILED
    named = (join.OBSERVED, join.DEFAULT, join.ORPHAN, join.OUT_OF_WINDOW)
    named += (join.LATE_OBSERVATION, join.OUT_OF_RANGE)
    assert all(a is b for a, b in zip(named, [*JoinStatus, *Unmatched], strict=True))
