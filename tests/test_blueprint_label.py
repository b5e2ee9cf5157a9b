"""The label's observability (``label.observable_when``) and inverse-propensity clip."""

import pytest
import yaml

from loopline.blueprint import DEFAULT_IPS_CLIP, BlueprintError, parse_blueprint

MINIMAL = """
name: notify
version: 3
features:
  - {name: tenure_days, type: int}
label: {name: clicked, observation: click, window: 1h, default: 0}
"""


def _label(**label) -> str:
    data = yaml.safe_load(MINIMAL)
    data["label"].update(label)
    return yaml.safe_dump(data)


def test_example_blueprint_observes_the_label_only_when_the_notification_was_sent(blueprint):
    assert blueprint.label.observable_when == (("decision", (1,)),)
    assert blueprint.label.ips_clip == 10.0


def test_without_observable_when_every_row_is_observable_with_the_default_clip():
    label = parse_blueprint(MINIMAL).label
    assert label.observable_when == ()
    assert label.is_observable({"decision": 0, "arm": ""})
    assert label.ips_clip == DEFAULT_IPS_CLIP


def test_row_is_observable_when_every_named_column_holds_a_listed_value():
    label = parse_blueprint(
        _label(observable_when={"decision": [1, 2], "arm": ["production"]})
    ).label
    assert label.is_observable({"decision": 2, "arm": "production"})
    assert not label.is_observable({"decision": 0, "arm": "production"})
    assert not label.is_observable({"decision": 1, "arm": "challenger"})


def test_explicit_absent_value_is_not_observable_unless_listed():
    label = parse_blueprint(_label(observable_when={"decision": [1]})).label
    assert not label.is_observable({"decision": -1})
    assert parse_blueprint(_label(observable_when={"decision": [1, -1]})).label.is_observable(
        {"decision": -1}
    )


def test_row_without_the_column_at_all_is_observable():
    """A span written before the join recorded provenance trains as it did before."""
    label = parse_blueprint(_label(observable_when={"decision": [1]})).label
    assert label.is_observable({})


@pytest.mark.parametrize(
    "value, field, problem",
    [
        ({"sent": [1]}, "label.observable_when", "'sent' is not a provenance column"),
        ({"propensity": [1.0]}, "label.observable_when", "'propensity' is not a provenance"),
        ({"decision": 1}, "label.observable_when.decision", "must be a non-empty list of ints"),
        ({"decision": []}, "label.observable_when.decision", "must be a non-empty list of ints"),
        ({"decision": ["1"]}, "label.observable_when.decision", "non-empty list of ints"),
        ({"decision": [True]}, "label.observable_when.decision", "non-empty list of ints"),
        ({"arm": [1]}, "label.observable_when.arm", "must be a non-empty list of strings"),
        ({}, "label.observable_when", "must map a provenance column"),
        ([1], "label.observable_when", "must map a provenance column"),
    ],
)
def test_bad_observable_when_names_file_field_and_problem(value, field, problem):
    with pytest.raises(BlueprintError) as error:
        parse_blueprint(_label(observable_when=value), source="bp.yaml")
    assert error.value.source == "bp.yaml"
    assert error.value.field_path == field
    assert problem in error.value.problem


@pytest.mark.parametrize("value", [0.5, 0, -3, True, "10", None])
def test_ips_clip_must_be_a_number_of_at_least_one(value):
    with pytest.raises(BlueprintError, match=r"bp.yaml: label.ips_clip: must be a number >= 1"):
        parse_blueprint(_label(ips_clip=value), source="bp.yaml")


def test_observable_when_changes_the_content_hash():
    assert (
        parse_blueprint(MINIMAL).content_hash
        != parse_blueprint(_label(observable_when={"decision": [1]})).content_hash
    )
