"""The gate's off-policy check in the real TFX pipeline (pipelines/train.py's EvidenceGate).

One run (LocalDagRunner, SQLite ML Metadata, DirectRunner) on one fixture span with a known
logging policy (tests/train_fixtures.py), under a blueprint whose policy sends only when the
model scores a click at least 90% likely: the candidate learns as well as ever (enough
positives, its AUC's interval above the floor, the Evaluator blesses it), but its policy would
hold nearly every notification, and the gate refuses it on the policy's value. The same
SavedModel under the example blueprint's own policy is not worse: AUC alone cannot tell the two.
"""

import json

import pytest
import yaml

from pipelines import gates, train_config
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.test_train import KEY, gate_verdict, run_train, versions
from tests.train_fixtures import write_span

SPAN_SIZE = 1500  # ~300 eval rows, ~165 of them sent, ~85 clicks: enough evidence to judge
TIMID_THRESHOLD = 0.9


@pytest.fixture(scope="module")
def timid_run(tmp_path_factory, blueprint):
    base = tmp_path_factory.mktemp("gate_ope")
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    data["policy"]["threshold"] = TIMID_THRESHOLD
    timid = base / "notify-timid.yaml"
    timid.write_text(yaml.safe_dump(data))
    span = base / "span"
    truth = write_span(span, blueprint, SPAN_SIZE, seed=1, key=KEY.encode())
    root, serving = base / "pipeline_root", base / "serving"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        flags = {
            "blueprint": timid,
            "examples": span,
            "pipeline_root": root,
            "serving_dir": serving,
        }
        rc, out, err = run_train(*(f"--{flag}={path}" for flag, path in flags.items()))
    assert rc == 0, err
    (record,) = [json.loads(p.read_text()) for p in (root / "records").glob("*.json")]
    return {
        "root": root,
        "serving": serving,
        "truth": truth,
        "out": out,
        "record": record,
        "verdict": gate_verdict(root),
    }


@pytest.mark.slow
def test_candidate_whose_policy_is_worse_but_auc_is_fine_is_refused_and_not_pushed(timid_run):
    verdict, record = timid_run["verdict"], timid_run["record"]
    assert not verdict["blessed"] and not record["blessed"] and not record["pushed"]
    assert versions(timid_run["serving"]) == []
    # Everything but the policy's value holds: the Evaluator blessed, the evidence is enough.
    assert record["validation_ok"]
    policy_reason = verdict["figures"]["policy_value"]["why"]
    assert verdict["evidence_failures"] == [policy_reason]
    assert verdict["why"] == policy_reason
    assert policy_reason.startswith(
        "policy value: the candidate's policy may earn less than the logged one: DR "
    )
    gated = verdict["figures"]["slices"]["decision=1"]
    assert gated["positives"] >= 50 and gated["auc_interval"][0] > 0.6
    assert f"not blessed: {record['why']}" in timid_run["out"]
    assert policy_reason in record["why"]


@pytest.mark.slow
def test_the_record_holds_every_figure_of_the_off_policy_check(timid_run):
    figures = timid_run["record"]["policy_value"]
    truth = timid_run["truth"]
    assert figures["rows"] == figures["n"] == truth.n_eval  # every fixture row has a propensity
    assert figures["excluded"]["total"] == 0
    assert figures["policy"]["threshold"] == TIMID_THRESHOLD
    for name in ("dr", "snips", "logged", "dr_gain", "snips_gain"):
        assert figures[name]["ci_low"] <= figures[name]["value"] <= figures[name]["ci_high"]
    # The logged value is the mean reward of the eval rows: their labels, read back.
    assert figures["logged"]["value"] == pytest.approx(
        sum(truth.eval_labels) / truth.n_eval, abs=1e-6
    )
    assert figures["send_share"] < 0.1  # the timid policy holds nearly everything
    assert figures["dr_gain"]["ci_high"] < -figures["tolerance"]


@pytest.mark.slow
def test_the_same_model_under_the_example_policy_is_not_worse(timid_run, blueprint):
    """Equal by AUC, different by policy: the refused candidate's SavedModel, read back with its
    eval examples, passes the check under examples/notify.yaml's policy (threshold 0.1)."""
    root = timid_run["root"]
    (model,) = (root / "Trainer" / "model").glob("*")
    (examples,) = (root / "ImportExampleGen" / "examples").glob("*")
    config = json.loads(train_config.gate_settings(blueprint))
    value = gates.check_policy_value(str(model), str(examples), config)
    assert value.passed, value.why
    refused = timid_run["record"]["policy_value"]
    assert value.figures["logged"] == refused["logged"]  # the same rows, the same log
    assert value.figures["dr"]["value"] > refused["dr"]["ci_high"]
