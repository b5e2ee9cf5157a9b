"""The rollout demo: scenarios with a known answer end as the truth says, through the real
client, monitor and promote (the models are oracle scorers; pipelines/rollout_demo.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopline import registry
from pipelines.rollout_demo import (
    DEMO_MIN_EXPOSURE,
    DEMO_SHARE,
    RolloutDemo,
    register_models,
    write_demo_blueprint,
)

REPO = Path(__file__).resolve().parent.parent


def run_demo(output: Path, scenario: str, days: int, decisions_per_day: int) -> tuple[str, dict]:
    """Runs ``python -m pipelines.demo --rollout``; (its last stdout line, rollout.json)."""
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--rollout", scenario, "--seed", "1",
         "--output", str(output), "--days", str(days),
         "--decisions_per_day", str(decisions_per_day)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "rollout.json").read_text())
    return result.stdout.strip().splitlines()[-1], summary


@pytest.fixture(scope="module")
def better(tmp_path_factory):
    output = tmp_path_factory.mktemp("better") / "out"
    return output, *run_demo(output, "better", days=3, decisions_per_day=4000)


@pytest.fixture(scope="module")
def worse(tmp_path_factory):
    output = tmp_path_factory.mktemp("worse") / "out"
    return output, *run_demo(output, "worse", days=3, decisions_per_day=2000)


@pytest.mark.slow
def test_a_better_challenger_is_promoted(better):
    output, last, summary = better
    assert last.startswith("rollout: promoted notify-2 to production after ")
    aliases = registry.read_aliases(str(output / "serving"))
    assert aliases.production == summary["challenger"]["model_id"]
    assert aliases.previous == summary["production"]["model_id"]
    assert aliases.challenger is None
    assert "challenger_better" in aliases.history[-1]["why"]


@pytest.mark.slow
def test_the_promoted_challenger_is_truly_better(better):
    _, _, summary = better
    rates = summary["true_expected_click_rate"]
    assert rates["challenger"] > rates["production"]


@pytest.mark.slow
def test_every_logged_decision_names_its_arm_model_score_and_propensity(better):
    output, _, summary = better
    model_of = {
        "production": summary["production"]["model_id"],
        "challenger": summary["challenger"]["model_id"],
    }
    lines = [
        json.loads(line)
        for path in sorted(output.glob("logs/*/decisions-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert lines and {e["arm"] for e in lines} == {"production", "challenger"}
    for event in lines:
        assert event["model_id"] == model_of[event["arm"]]
        assert 0 <= event["score"] <= 1 and 0 < event["propensity"] <= 1


@pytest.mark.slow
def test_a_worse_challenger_is_rolled_back(worse):
    output, last, summary = worse
    assert last.startswith("rollout: rolled back notify-2 after ")
    aliases = registry.read_aliases(str(output / "serving"))
    assert aliases.production == summary["production"]["model_id"]
    assert aliases.challenger is None
    assert "challenger_worse" in aliases.history[-1]["why"]
    rates = summary["true_expected_click_rate"]
    assert rates["challenger"] < rates["production"]


@pytest.mark.slow
def test_an_identical_challenger_changes_nothing(tmp_path):
    last, summary = run_demo(tmp_path / "out", "same", days=1, decisions_per_day=2000)
    assert last.startswith("rollout: no change after 1 day: notify-2 still serves")
    aliases = registry.read_aliases(str(tmp_path / "out" / "serving"))
    assert aliases.challenger == summary["challenger"]["model_id"]
    assert aliases.production == summary["production"]["model_id"]
    # promote counts the split's age in simulated days
    assert "inconclusive after 1.0 of 14 days" in summary["days"][0]["promote"]


def test_the_demo_blueprint_sets_the_rollout_for_a_short_demo(tmp_path, blueprint_path):
    demo_blueprint = write_demo_blueprint(str(blueprint_path), tmp_path / "blueprint.yaml")
    assert demo_blueprint.rollout.challenger_share == DEMO_SHARE
    assert demo_blueprint.rollout.min_exposure == DEMO_MIN_EXPOSURE
    assert "max_calibration_error" not in demo_blueprint.monitor
    assert demo_blueprint.monitor["min_auc"] == 0.6  # the other thresholds stay


def test_a_blueprint_without_a_rollout_section_is_refused(tmp_path, blueprint_path):
    text = blueprint_path.read_text().split("\nrollout:")[0]
    (tmp_path / "plain.yaml").write_text(text)
    with pytest.raises(ValueError, match="has no rollout section"):
        write_demo_blueprint(str(tmp_path / "plain.yaml"), tmp_path / "blueprint.yaml")


def test_the_demo_registers_production_and_a_challenger(tmp_path, blueprint_path):
    from datetime import datetime, timezone

    demo = RolloutDemo("worse", tmp_path, str(blueprint_path), 1, 100,
                       datetime(2026, 11, 1, tzinfo=timezone.utc), 3)  # fmt: skip
    production, challenger = register_models(
        demo, write_demo_blueprint(str(blueprint_path), demo.blueprint_path)
    )
    aliases = registry.read_aliases(demo.serving_dir)
    assert (aliases.production, aliases.challenger) == (production.model_id, challenger.model_id)
    assert registry.find_record(demo.serving_dir, challenger.model_id)["name"] == "notify-2"
    assert production.scorer.model_id == production.model_id
    assert challenger.scorer.model_id == challenger.model_id
