"""Flex Template metadata (templates/<pipeline>/metadata.json) against the pipelines' options.

Every template must list exactly the parameters of its pipeline's ``PipelineOptions`` subclass
(introspected through ``_add_argparse_args`` on a fresh parser), both ways, each with a label,
help text and regexes that accept what the pipeline takes on Dataflow and refuse the rest.
The check is generic: a template added for a new pipeline is covered as it lands.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = sorted(p.parent.name for p in (REPO / "templates").glob("*/metadata.json"))
GCS_REGEX = r"^gs:\/\/[^\n\r]+$"
SUBSCRIPTION_REGEX = r"^projects\/[^\n\r\/]+\/subscriptions\/[^\n\r\/]+$"
SECRET_VERSION_REGEX = r"^projects\/[^\n\r\/]+\/secrets\/[^\n\r\/]+\/versions\/[^\n\r\/]+$"


def metadata(name: str) -> dict:
    return json.loads((REPO / "templates" / name / "metadata.json").read_text())


def options_class(pipeline: str) -> type[PipelineOptions]:
    """The one PipelineOptions subclass defined in pipelines/<pipeline>.py."""
    module = importlib.import_module(f"pipelines.{pipeline}")
    found = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, PipelineOptions)
        and cls is not PipelineOptions
        and cls.__module__ == module.__name__
    ]
    assert len(found) == 1, f"pipelines.{pipeline} should define one PipelineOptions subclass"
    return found[0]


def option_actions(pipeline: str) -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    options_class(pipeline)._add_argparse_args(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def regex_accepts(param: dict, value: str) -> bool:
    return all(re.fullmatch(r, value) for r in param.get("regexes", []))


def test_every_pipeline_with_options_has_a_template():
    pipelines = [
        p.stem
        for p in (REPO / "pipelines").glob("*.py")
        if re.search(r"^class \w+\(PipelineOptions\):", p.read_text(), re.MULTILINE)
    ]
    assert pipelines, "no pipeline defines options"
    assert sorted(pipelines) == TEMPLATES


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_parameters_are_exactly_the_pipeline_options(name):
    declared = [p["name"] for p in metadata(name)["parameters"]]
    assert len(declared) == len(set(declared)), f"duplicate parameters in {name}"
    options = set(option_actions(name))
    assert set(declared) - options == set(), "parameters the pipeline does not accept"
    assert options - set(declared) == set(), "pipeline options missing from the template"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_parameters_are_documented_and_typed(name):
    doc = metadata(name)
    assert doc["name"] and doc["description"]
    actions = option_actions(name)
    for param in doc["parameters"]:
        where = f"{name}.{param['name']}"
        assert set(param) <= {"name", "label", "helpText", "isOptional", "regexes"}, where
        assert param["label"].strip() and param["helpText"].strip(), where
        assert isinstance(param["isOptional"], bool), where
        assert param.get("regexes"), f"{where} has no regex"
        for regex in param["regexes"]:
            re.compile(regex)
        action = actions[param["name"]]
        if not param["isOptional"]:
            assert action.default is None, f"{where} is required but has a default"
        if action.choices:
            for choice in action.choices:
                assert regex_accepts(param, str(choice)), f"{where} refuses {choice!r}"
            assert not regex_accepts(param, "not-a-choice"), where


@pytest.mark.parametrize("name", TEMPLATES)
def test_regexes_fit_the_kind_of_value(name):
    for param in metadata(name)["parameters"]:
        key, help_text = param["name"], param["helpText"]
        where = f"{name}.{key}"
        if "Cloud Storage" in help_text:
            assert GCS_REGEX in param["regexes"], where
            assert regex_accepts(param, "gs://bucket/logs/notify/2026-11-01/decisions-*.jsonl")
            assert not regex_accepts(param, "/home/me/logs/decisions.jsonl"), where
        elif key.endswith("_subscription"):
            assert param["regexes"] == [SUBSCRIPTION_REGEX], where
            assert regex_accepts(param, "projects/p/subscriptions/notify-decisions")
            assert not regex_accepts(param, "projects/p/topics/notify-decisions"), where
        elif key.endswith("_secret"):
            assert param["regexes"] == [SECRET_VERSION_REGEX], where
            assert regex_accepts(param, "projects/p/secrets/loopline-pii-key/versions/latest")
            assert not regex_accepts(param, "projects/p/secrets/loopline-pii-key"), where
        elif key.endswith("_table"):
            assert regex_accepts(param, "my-project:logs.decisions"), where
            assert regex_accepts(param, "logs.decisions"), where
            assert not regex_accepts(param, "decisions"), where
        elif key in ("allowed_lateness", "output_window"):
            for good in ("0s", "10m", "1h", "2d", "250ms"):
                assert regex_accepts(param, good), f"{where} refuses {good}"
            assert not regex_accepts(param, "ten minutes"), where
        elif key.endswith(("_size", "_shards", "_copies")):
            assert regex_accepts(param, "64") and not regex_accepts(param, "0"), where


def test_secret_regex_is_the_one_the_launcher_checks():
    """What a template lets through, pii_key accepts, and the other way round."""
    from loopline.examples import SECRET_VERSION

    for value in (
        "projects/p/secrets/s/versions/3",
        "projects/p/secrets/s",
        "projects/p/secrets/s/versions/3/x",
        "projects//secrets/s/versions/3",
    ):
        assert bool(re.fullmatch(SECRET_VERSION_REGEX, value)) == bool(
            SECRET_VERSION.fullmatch(value)
        ), value


def test_dataflow_inputs_and_outputs_are_cloud_storage_paths():
    """What a template reads or writes on Dataflow is a gs:// path, never a local one."""
    for name in TEMPLATES:
        for param in metadata(name)["parameters"]:
            if param["name"] in ("blueprint", "output", "model_dir"):
                assert GCS_REGEX in param["regexes"], f"{name}.{param['name']}"
