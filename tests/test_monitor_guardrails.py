"""The monitor's rollout guardrails end to end: a simulated two-arm log with known rates runs
through ``pipelines.monitor``; a challenger that wins on clicks but drives unsubscribes up is
rolled back by ``python -m pipelines.promote`` on the monitor's own verdict file, and one that
leaves unsubscribes alone is promoted with no guardrail fired."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from loopline import registry
from pipelines import monitor
from tests.test_monitor import ROLLOUT_BLUEPRINT, rollout_fixture

REPO = Path(__file__).resolve().parents[1]
BLUEPRINT = ROLLOUT_BLUEPRINT.replace(
    "max_days: 14}",
    "max_days: 14,\n  guardrails: [{name: unsubscribed, observation: unsubscribe, "
    "aggregation: max, direction: decrease}]}",
)


def two_arm_log(root: Path, unsubscribe_rates: dict) -> list[str]:
    """400 users over 3 days, half in each arm; the challenger truly triples clicks (30% vs
    10%) and unsubscribes follow ``unsubscribe_rates`` (10 minutes after the decision, inside
    the label window), next to late unsubscribes (3 hours after, half the decisions) that must
    not count. Returns the monitor's argv."""
    late = {"production": 0.5, "challenger": 0.5}
    more = [
        ("unsubscribe", unsubscribe_rates, timedelta(minutes=10)),
        ("unsubscribe", late, timedelta(hours=3)),
    ]
    return rollout_fixture(root, challenger_rate=0.3, blueprint=BLUEPRINT, more=more)


@pytest.fixture(scope="module")
def harmful(tmp_path_factory):
    """The challenger triples clicks but unsubscribes 15% of users a day against 2%."""
    root = tmp_path_factory.mktemp("harmful")
    metrics = monitor.run(two_arm_log(root, {"production": 0.02, "challenger": 0.15}))
    return metrics, root / "out"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The challenger triples clicks and unsubscribes as often as production (3%)."""
    root = tmp_path_factory.mktemp("clean")
    metrics = monitor.run(two_arm_log(root, {"production": 0.03, "challenger": 0.03}))
    return metrics, root / "out"


def serving_dir(root: Path) -> Path:
    """notify-old in production and notify-new as the challenger, as the registry holds them."""
    serving = root / "serving"
    for version, model_id in (("1", "notify-old"), ("2", "notify-new")):
        (serving / version).mkdir(parents=True)
        (serving / version / "saved_model.pb").write_bytes(b"placeholder")
        record = {"model_id": model_id, "name": model_id, "version": version,
                  "blessed": True, "pushed": True}  # fmt: skip
        (serving / f"{version}.record.json").write_text(json.dumps(record))
        registry.register(str(serving), record)
        if model_id == "notify-old":
            registry.promote(str(serving), "the incumbent")
    return serving


def promote_cli(serving: Path, verdict: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "pipelines.promote", "--serving_dir", str(serving),
         "--verdict", str(verdict)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_a_broken_guardrail_makes_a_winning_challenger_worse(harmful):
    experiment = harmful[0]["experiment"]
    assert experiment["figures"]["primary"]["outcome"] == "better"  # it does win on clicks
    assert experiment["verdict"] == "challenger_worse"
    assert experiment["sentence"].startswith(
        "The challenger made guardrail unsubscribed (unsubscribe per decision, lower is better) "
        "worse: unsubscribed mean"
    )


@pytest.mark.slow
def test_the_guardrail_figures_match_the_simulated_rates(harmful):
    (guardrail,) = harmful[0]["experiment"]["guardrails"]
    assert guardrail["name"] == "unsubscribed" and guardrail["fired"]
    figures = guardrail["figures"]
    assert figures["production_mean"] == pytest.approx(0.02, abs=0.015)
    assert figures["challenger_mean"] == pytest.approx(0.15, abs=0.03)
    low, high = figures["ci"]
    assert 0 < low < 0.13 < high  # the true difference, inside an interval clear of zero
    assert figures["days"] == 3


@pytest.mark.slow
def test_the_verdict_file_names_the_fired_guardrail_with_its_figures(harmful):
    verdict = json.loads((harmful[1] / "verdict.json").read_text())
    assert verdict["verdict"] == "challenger_worse"
    assert verdict["flags"] == [
        "guardrail unsubscribed worse for the challenger (unsubscribe per decision (max of its "
        "observations in the label window, 0 when none), lower is better)"
    ]
    (guardrail,) = verdict["guardrails"]
    assert guardrail["fired"] and guardrail["challenger_mean"] > guardrail["production_mean"]


@pytest.mark.slow
def test_promote_rolls_back_a_challenger_whose_guardrail_fired(harmful, tmp_path):
    serving = serving_dir(tmp_path)
    proc = promote_cli(serving, harmful[1] / "verdict.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("promote: rolled back notify-new")
    aliases = registry.read_aliases(str(serving))
    assert (aliases.production, aliases.challenger) == ("notify-old", None)
    assert "guardrail unsubscribed worse" in aliases.history[-1]["why"]


@pytest.mark.slow
def test_the_report_shows_each_guardrails_figures(harmful):
    html = (harmful[1] / "report.html").read_text()
    assert "<h3>Guardrails</h3>" in html
    assert "unsubscribe per decision" in html and "fired</span>" in html


@pytest.mark.slow
def test_a_clean_guardrail_lets_a_winning_challenger_through(clean, tmp_path):
    metrics, out = clean
    experiment = metrics["experiment"]
    assert experiment["verdict"] == "challenger_better"
    (guardrail,) = experiment["guardrails"]
    assert not guardrail["fired"] and guardrail["figures"]["outcome"] != "worse"
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["flags"] == [] and verdict["guardrails"][0]["fired"] is False
    serving = serving_dir(tmp_path)
    proc = promote_cli(serving, out / "verdict.json")
    assert proc.returncode == 0, proc.stderr
    assert registry.read_aliases(str(serving)).production == "notify-new"
