"""Blueprint loading, validation errors that name file and field, durations and the content hash."""

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from loopline.blueprint import (
    BlueprintError,
    Guardrail,
    format_duration,
    load_blueprint,
    parse_blueprint,
    parse_duration,
)

MINIMAL = """
name: notify
version: 3
features:
  - {name: tenure_days, type: int}
  - {name: country, type: string}
  - {name: recent_clicks, type: float_list}
label: {name: clicked, observation: click, aggregation: max, window: 1h, backward_slack: 2m, default: 0}
"""


def _with(**changes) -> str:
    data = yaml.safe_load(MINIMAL)
    for path, value in changes.items():
        target = data
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return yaml.safe_dump(data)


_DELETE = object()


def test_example_blueprint_loads_with_all_sections(blueprint):
    assert blueprint.name == "notify"
    assert blueprint.version == "1"
    assert blueprint.label.window_ms == 3_600_000
    assert blueprint.label.backward_slack_ms == 120_000
    assert blueprint.label.type == "int"
    assert "user_id" in blueprint.privacy.pseudonymise
    assert "email" not in {f.name for f in blueprint.example_features}
    assert blueprint.model["hidden_units"] == [64, 32]
    assert blueprint.policy["type"] == "epsilon_greedy"
    assert len(blueprint.content_hash) == 64


def test_minimal_blueprint_gets_defaults():
    bp = parse_blueprint(MINIMAL)
    assert bp.version == "3"
    assert bp.eval_fraction == 0.2
    assert bp.feature_types == {
        "tenure_days": "int",
        "country": "string",
        "recent_clicks": "float_list",
    }
    assert bp.privacy.pseudonymise == () and bp.model == {}
    assert bp.fallback_decision == 0


@pytest.mark.parametrize(
    "text, duration_ms",
    [
        ("90s", 90_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("2d", 172_800_000),
        ("250ms", 250),
        ("1.5h", 5_400_000),
        (30, 30_000),
        ("0s", 0),
    ],
)
def test_durations_parse_to_milliseconds(text, duration_ms):
    assert parse_duration(text) == duration_ms


@pytest.mark.parametrize("bad", ["1 week", "h", "-5m", "", None, True, -3, "5x"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@given(st.integers(min_value=1, max_value=10**12))
def test_format_duration_round_trips(ms):
    assert parse_duration(format_duration(ms)) == ms


def test_content_hash_ignores_layout_but_not_content():
    same = parse_blueprint(MINIMAL + "\n# a comment\n")
    assert same.content_hash == parse_blueprint(MINIMAL).content_hash
    changed = parse_blueprint(_with(label__window="2h"))
    assert changed.content_hash != same.content_hash


@pytest.mark.parametrize(
    "changes, field, problem",
    [
        ({"name": _DELETE}, "name", "is required"),
        ({"name": "not a name"}, "name", "identifier"),
        ({"version": _DELETE}, "version", "is required"),
        ({"features": []}, "features", "non-empty"),
        ({"features": [{"name": "x", "type": "double"}]}, "features[0].type", "int, float"),
        (
            {"features": [{"name": "x", "type": "int"}, {"name": "x", "type": "int"}]},
            "features[1].name",
            "twice",
        ),
        ({"features": [{"name": "decision_id", "type": "string"}]}, "features[0].name", "reserved"),
        ({"label__window": "soon"}, "label.window", "duration"),
        ({"label__window": _DELETE}, "label.window", "is required"),
        ({"label__window": "0s"}, "label.window", "longer than zero"),
        ({"label__aggregation": "median"}, "label.aggregation", "sum, max"),
        ({"label__default": "no"}, "label.default", "number"),
        ({"label__name": "country"}, "label.name", "collides"),
        ({"label__type": "int", "label__aggregation": "mean"}, "label.type", "float"),
        ({"eval_fraction": 1.5}, "eval_fraction", "[0, 1)"),
        ({"model": [1]}, "model", "mapping"),
        ({"colour": "red"}, "colour", "not a blueprint field"),
        ({"privacy": {"pseudonymise": ["nope"]}}, "privacy.pseudonymise", "not a declared feature"),
        ({"privacy": {"pseudonymise": ["tenure_days"]}}, "privacy.pseudonymise", "only string"),
        ({"privacy": {"drop": ["country"], "pseudonymise": ["country"]}}, "privacy", "both"),
    ],
)
def test_errors_name_the_file_the_field_and_the_problem(changes, field, problem):
    with pytest.raises(BlueprintError) as err:
        parse_blueprint(_with(**changes), source="bp/notify.yaml")
    assert err.value.field_path == field
    assert problem in err.value.problem
    assert str(err.value).startswith(f"bp/notify.yaml: {field}: ")


def test_unreadable_and_invalid_yaml_files_are_named(tmp_path):
    with pytest.raises(BlueprintError, match="missing.yaml: <file>: cannot be read"):
        load_blueprint(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(BlueprintError, match="bad.yaml: <yaml>: is not valid YAML"):
        load_blueprint(bad)


def test_mean_label_is_float_and_label_counts_window_bounds_inclusively():
    bp = parse_blueprint(_with(label__aggregation="mean"))
    assert bp.label.type == "float"
    label = bp.label
    td = 1_000_000_000
    assert label.counts(td, td - label.backward_slack_ms)
    assert label.counts(td, td + label.window_ms)
    assert not label.counts(td, td - label.backward_slack_ms - 1)
    assert not label.counts(td, td + label.window_ms + 1)


# -- rollout ----------------------------------------------------------------------------------

ROLLOUT = {"unit": "country", "challenger_share": 0.2, "salt": "exp-1"}


def _rollout(**changes) -> str:
    data = yaml.safe_load(MINIMAL)
    data["rollout"] = {**ROLLOUT, **changes}
    for key, value in changes.items():
        if value is _DELETE:
            del data["rollout"][key]
    return yaml.safe_dump(data)


def test_example_blueprint_rolls_out_by_user(blueprint):
    rollout = blueprint.rollout
    assert rollout.unit == "user_id"
    assert 0 < rollout.challenger_share < 1
    assert (rollout.metric, rollout.direction) == ("rate", "increase")
    assert rollout.alpha == 0.05


def test_blueprint_without_rollout_has_none():
    assert parse_blueprint(MINIMAL).rollout is None


def test_rollout_defaults_to_the_label_as_a_rate_with_standard_test_settings():
    rollout = parse_blueprint(_rollout()).rollout
    assert (rollout.unit, rollout.challenger_share, rollout.salt) == ("country", 0.2, "exp-1")
    assert (rollout.metric, rollout.direction) == ("rate", "increase")
    assert (rollout.alpha, rollout.srm_alpha) == (0.05, 0.001)
    assert (rollout.min_exposure, rollout.max_days) == (1000, 14)
    assert rollout.guardrails == ()


def test_rollout_of_a_float_label_defaults_to_a_mean():
    data = yaml.safe_load(_rollout())
    data["label"]["aggregation"] = "mean"
    assert parse_blueprint(yaml.safe_dump(data)).rollout.metric == "mean"


def test_guardrails_are_named_after_their_observation_unless_named():
    rollout = parse_blueprint(
        _rollout(
            guardrails=[
                {"observation": "unsubscribe", "direction": "decrease"},
                {
                    "observation": "dwell",
                    "aggregation": "sum",
                    "direction": "increase",
                    "name": "dwell_time",
                },
            ]
        )
    ).rollout
    assert rollout.guardrails == (
        Guardrail("unsubscribe_max", "unsubscribe", "max", "decrease"),
        Guardrail("dwell_time", "dwell", "sum", "increase"),
    )


@pytest.mark.parametrize(
    "changes, field, problem",
    [
        ({"unit": _DELETE}, "rollout.unit", "declared feature"),
        ({"unit": "user_id"}, "rollout.unit", "declared feature"),
        ({"unit": "recent_clicks"}, "rollout.unit", "string or an int"),
        ({"challenger_share": _DELETE}, "rollout.challenger_share", "is required"),
        ({"challenger_share": 1}, "rollout.challenger_share", "between 0 and 1"),
        ({"challenger_share": 0}, "rollout.challenger_share", "between 0 and 1"),
        ({"challenger_share": "half"}, "rollout.challenger_share", "between 0 and 1"),
        ({"salt": _DELETE}, "rollout.salt", "is required"),
        ({"salt": ""}, "rollout.salt", "is required"),
        ({"primary": {"metric": "median"}}, "rollout.primary.metric", "rate or mean"),
        ({"primary": {"direction": "up"}}, "rollout.primary.direction", "increase or decrease"),
        ({"primary": {"observation": "open"}}, "rollout.primary", "always the label"),
        ({"guardrails": {"observation": "x"}}, "rollout.guardrails", "must be a list"),
        (
            {"guardrails": [{"direction": "decrease"}]},
            "rollout.guardrails[0].observation",
            "required",
        ),
        ({"guardrails": [{"observation": "x"}]}, "rollout.guardrails[0].direction", "increase or"),
        (
            {"guardrails": [{"observation": "x", "direction": "decrease", "aggregation": "p99"}]},
            "rollout.guardrails[0].aggregation",
            "sum, max",
        ),
        (
            {"guardrails": [{"observation": "x", "direction": "decrease", "name": "clicked"}]},
            "rollout.guardrails[0].name",
            "already the label",
        ),
        (
            {"guardrails": [{"observation": "x", "direction": "decrease"}] * 2},
            "rollout.guardrails[1].name",
            "another guardrail",
        ),
        ({"alpha": 0.6}, "rollout.alpha", "between 0 and 0.5"),
        ({"srm_alpha": 0}, "rollout.srm_alpha", "between 0 and 0.5"),
        ({"min_exposure": 0}, "rollout.min_exposure", "positive integer"),
        ({"max_days": 2.5}, "rollout.max_days", "positive integer"),
        ({"traffic": 0.2}, "rollout", "unknown keys ['traffic']"),
    ],
)
def test_rollout_errors_name_the_file_the_field_and_the_problem(changes, field, problem):
    with pytest.raises(BlueprintError) as err:
        parse_blueprint(_rollout(**changes), source="bp/notify.yaml")
    assert err.value.field_path == field
    assert problem in err.value.problem


def test_a_rate_needs_an_int_label():
    data = yaml.safe_load(_rollout(primary={"metric": "rate"}))
    data["label"]["type"] = "float"
    with pytest.raises(BlueprintError, match="rollout.primary.metric: a rate needs an int"):
        parse_blueprint(yaml.safe_dump(data))


def test_rollout_that_is_not_a_mapping_is_refused():
    data = yaml.safe_load(MINIMAL)
    data["rollout"] = ["user_id", 0.2]
    with pytest.raises(BlueprintError, match="rollout: must be a mapping"):
        parse_blueprint(yaml.safe_dump(data))
