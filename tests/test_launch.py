"""Each Flex Template's pipeline launched the way the template launcher launches it.

The launcher runs ``python <pipeline file>`` with one ``--name=value`` flag per template
parameter; here each template's own entry file (cloudbuild.yaml's FLEX_TEMPLATE_PYTHON_PY_FILE,
``tests.flex_templates``) is run as ``python <file>`` from outside the repository, with the
package on PYTHONPATH as the image installs it and flags checked against
``templates/<name>/metadata.json`` (names and regexes), on the DirectRunner, with local paths
and simulated data (``python -m loopline.simulate``). Every template needs a launch scenario
below, so a new template fails here until it is launched too. tests/test_flex_entry_files.py
runs the join and the monitor the same way on multi-process workers.

The entry points that are not Flex Templates (``train``, ``promote``) share the launch path
(``pipelines.launch.parse_flags``); their ``--help`` is checked here, their bad command lines in
tests/test_train.py and tests/test_promote.py.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopline.blueprint import load_blueprint
from tests.flex_templates import REPO, check_parameters, entry_file, flags, package_env
from tests.scoring_fixtures import export_scoring_model

BLUEPRINT = REPO / "examples" / "notify.yaml"
TEMPLATES = sorted(p.parent.name for p in (REPO / "templates").glob("*/metadata.json"))
ENV = {
    **package_env(dict(os.environ)),
    "LOOPLINE_PII_KEY": "test-key-not-a-secret",
    "TF_USE_LEGACY_KERAS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def launch(pipeline: str, parameters: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs the template's entry file as the launcher would: parameters as --name=value flags,
    from the directory above the output (not the repository)."""
    check_parameters(pipeline, parameters)
    argv = [sys.executable, str(entry_file(pipeline)), "--runner=DirectRunner", *flags(parameters)]
    cwd = Path(parameters["output"]).parent
    result = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{pipeline}: {result.stderr[-4000:]}"
    return result


def simulate(output: Path, *args: str) -> None:
    """``python -m loopline.simulate`` for the example blueprint, seed 11."""
    subprocess.run(
        [sys.executable, "-m", "loopline.simulate", "--blueprint", str(BLUEPRINT),
         "--output", str(output), "--seed", "11", *args],
        cwd=REPO, env=ENV, check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """One simulated day of logs, and a pushed model with the serving contract."""
    root = tmp_path_factory.mktemp("launch")
    simulate(root / "logs", "--decisions", "300", "--days", "1", "--start", "2026-11-01")
    export_scoring_model(load_blueprint(BLUEPRINT), root / "serving" / "1793534400", seed=3)
    return root


def launch_join_decisions(root: Path) -> None:
    span = root / "span"
    launch(
        "join_decisions",
        {
            "decisions": f"{root}/logs/decisions-*.jsonl",
            "observations": f"{root}/logs/observations-*.jsonl",
            "blueprint": str(BLUEPRINT),
            "output": str(span),
            "allowed_lateness": "10m",
            "num_shards": "1",
        },
    )
    manifest = json.loads((span / "manifest.json").read_text())
    assert manifest["decisions_in"] > 0
    assert (
        manifest["examples_written"] == manifest["examples_observed"] + manifest["examples_default"]
    )
    assert list((span / "examples" / "train").glob("*.tfrecord.gz"))


def launch_bulk_score(root: Path) -> None:
    out = root / "scored"
    launch(
        "bulk_score",
        {
            "input": f"{root}/logs/decisions-*.jsonl",
            "model_dir": str(root / "serving"),
            "blueprint": str(BLUEPRINT),
            "output": str(out),
            "log_decisions": "true",
            "min_batch_size": "8",
            "max_batch_size": "64",
            "device": "CPU",
        },
    )
    rows = [
        json.loads(line)
        for f in (out / "scores").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert rows and all(r["model_id"] == "notify-1793534400" for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert list((out / "decisions").glob("*.jsonl"))


def launch_monitor(root: Path) -> None:
    if not (root / "scored" / "scores").is_dir():
        launch_bulk_score(root)
    outcomes = root / "outcomes"
    simulate(outcomes, "--outcomes_for", f"{root}/scored/decisions/*.jsonl")
    out = root / "monitor"
    launch(
        "monitor",
        {
            "scores": f"{root}/scored/scores/*.jsonl",
            "decisions": f"{root}/scored/decisions/*.jsonl",
            "observations": f"{outcomes}/observations-*.jsonl",
            "blueprint": str(BLUEPRINT),
            "output": str(out),
            # The untrained scoring model is past the blueprint's calibration threshold; that
            # the monitor then fails the run is tests/test_monitor.py's to show.
            "fail_on_flags": "false",
        },
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics
    assert (out / "report.html").is_file()


SCENARIOS = {
    "join_decisions": launch_join_decisions,
    "bulk_score": launch_bulk_score,
    "monitor": launch_monitor,
}


def test_every_template_has_a_launch_scenario():
    assert sorted(SCENARIOS) == TEMPLATES


@pytest.mark.parametrize(
    "entry_point, flags, beam_options",
    [
        ("train", ("--blueprint", "--examples", "--dataset_root", "--compile_vertex"), True),
        ("promote", ("--serving_dir", "--verdict", "--roll_back", "--why", "--max_days"), False),
    ],
)
def test_help_lists_the_entry_points_own_flags(entry_point, flags, beam_options, capsys):
    module = importlib.import_module(f"pipelines.{entry_point}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m pipelines.{entry_point}")
    assert all(flag in text for flag in flags)
    assert ("Standard Beam options" in text) == beam_options


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", TEMPLATES)
def test_pipeline_runs_as_its_template_launches_it(pipeline, workspace):
    SCENARIOS[pipeline](workspace)
