"""python -m pipelines.bulk_score in rollout mode (the default for a blueprint with a rollout
section): both arms served in one pipeline, on the DirectRunner with real files and real
SavedModels registered in a real registry.

Each scenario runs once per module (a module fixture) and small tests read its outputs: two
models in traffic, production still null (no promotion yet), both aliases null, and the same
two-arm run with workers in separate processes. Arms are checked against the real
``DecisionClient``: a unit must land in the same arm whoever decides for it.
"""

import json
from pathlib import Path

import pytest

from loopline.blueprint import load_blueprint
from loopline.client import DecisionClient
from loopline.events import parse_decision_json
from pipelines import bulk_score
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.scoring_fixtures import (
    bulk_score_in_processes,
    expected_scores,
    export_scoring_model,
    make_decisions,
    write_decision_lines,
)
from tests.scoring_fixtures import read_json_lines as _lines

KEY = "test-key-not-a-secret"
N = 240
PRODUCTION_VERSION, CHALLENGER_VERSION = "1793534400", "1793538000"
PRODUCTION_ID, CHALLENGER_ID = f"notify-{PRODUCTION_VERSION}", f"notify-{CHALLENGER_VERSION}"


class ListSink:
    """The decision client's sink, in memory."""

    def __init__(self):
        self.events = []

    def write(self, event) -> None:
        self.events.append(event)


def client_arms(blueprint, events) -> dict[str, str]:
    """The arm the real decision client gives each decision, with both arms' scorers set."""
    client = DecisionClient(blueprint, ListSink(), scorer=lambda f: 0.5, challenger=lambda f: 0.5)
    return {e.decision_id: client.get_decision(e.decision_id, e.features).arm for e in events}


def _model_scores(events, blueprint, version_dir) -> dict[str, float]:
    return expected_scores(events, blueprint, KEY.encode(), version_dir)


def _args(source, serving, out, *extra) -> list[str]:
    return [
        "--input", str(source), "--model_dir", str(serving),
        "--blueprint", str(EXAMPLE_BLUEPRINT), "--output", str(out), "--log_decisions",
        "--min_batch_size", "16", "--max_batch_size", "64", *extra,
    ]  # fmt: skip


def _serving(root: Path, blueprint, production: bool, challenger: bool) -> Path:
    """A serving dir with the production and/or challenger alias set (both versions pushed)."""
    root.mkdir(parents=True)
    if production:
        export_scoring_model(blueprint, root / PRODUCTION_VERSION, seed=1)
    if challenger:
        export_scoring_model(blueprint, root / CHALLENGER_VERSION, seed=2, production=False)
    return root


def _run(work: Path, serving: Path, events, *extra) -> Path:
    source = write_decision_lines(work / "decisions.jsonl", events)
    out = work / "out"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        bulk_score.run(_args(source, serving, out, *extra))
    return out


@pytest.fixture(scope="module")
def events():
    return make_decisions(load_blueprint(EXAMPLE_BLUEPRINT), N, seed=11)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, blueprint):
    return _serving(tmp_path_factory.mktemp("two") / "serving", blueprint, True, True)


@pytest.fixture(scope="module")
def two_arm_run(tmp_path_factory, two_models, events):
    """Production and challenger both in the registry: each arm scored by its own model."""
    return _run(tmp_path_factory.mktemp("two_arm_run"), two_models, events)


@pytest.fixture(scope="module")
def no_production_run(tmp_path_factory, blueprint, events):
    """The first model pushed is the challenger; production is still null."""
    work = tmp_path_factory.mktemp("no_production")
    serving = _serving(work / "serving", blueprint, False, True)
    return _run(work, serving, events)


@pytest.fixture(scope="module")
def no_model_run(tmp_path_factory, blueprint, events):
    """Nothing registered yet: both aliases null."""
    work = tmp_path_factory.mktemp("no_model")
    serving = _serving(work / "serving", blueprint, False, False)
    return _run(work, serving, events)


@pytest.mark.slow
def test_rows_split_by_unit_exactly_as_the_decision_client_assigns_them(
    two_arm_run, blueprint, events
):
    rows = _lines(two_arm_run / "scores")
    expected = client_arms(blueprint, events)
    assert {r["decision_id"]: r["arm"] for r in rows} == expected
    assert set(expected.values()) == {"production", "challenger"}


@pytest.mark.slow
def test_each_row_is_scored_by_its_arms_own_model(two_arm_run, two_models, blueprint, events):
    by_arm = {
        "production": (PRODUCTION_ID, _model_scores(events, blueprint, two_models / PRODUCTION_VERSION)),
        "challenger": (CHALLENGER_ID, _model_scores(events, blueprint, two_models / CHALLENGER_VERSION)),
    }  # fmt: skip
    rows = _lines(two_arm_run / "scores")
    assert len(rows) == N
    for row in rows:
        model_id, scores = by_arm[row["arm"]]
        assert row["model_id"] == model_id
        assert row["score"] == pytest.approx(scores[row["decision_id"]], rel=1e-6, abs=1e-7)
        # examples/notify.yaml: epsilon-greedy at epsilon 0.05.
        assert row["propensity"] in (pytest.approx(0.975), pytest.approx(0.025))


@pytest.mark.slow
def test_logged_decisions_carry_arm_model_score_and_propensity(two_arm_run, blueprint, events):
    rows = {r["decision_id"]: r for r in _lines(two_arm_run / "scores")}
    logged = [
        parse_decision_json(json.dumps(d), blueprint) for d in _lines(two_arm_run / "decisions")
    ]
    originals = {e.decision_id: e for e in events}
    assert sorted(e.decision_id for e in logged) == sorted(originals)
    for event in logged:
        row = rows[event.decision_id]
        assert event == originals[event.decision_id].with_choice(
            row["decision"], row["propensity"], row["model_id"], score=row["score"], arm=row["arm"]
        )


@pytest.mark.slow
def test_the_manifest_counts_each_arm_and_names_both_models(two_arm_run, blueprint, events):
    manifest = json.loads((two_arm_run / "manifest.json").read_text())
    arms = list(client_arms(blueprint, events).values())
    counters = manifest["counters"]
    assert counters["score.decisions"] == N
    assert counters["score.decisions_production"] == arms.count("production")
    assert counters["score.decisions_challenger"] == arms.count("challenger")
    assert counters.get("score.fallback_decisions", 0) == 0
    assert manifest["mode"] == "rollout"
    assert manifest["arms"] == {"production": PRODUCTION_ID, "challenger": CHALLENGER_ID}


@pytest.mark.slow
def test_without_production_its_arm_gets_the_fallback_and_the_challenger_scores(
    no_production_run, two_models, blueprint, events
):
    arms = client_arms(blueprint, events)
    challenger = _model_scores(events, blueprint, two_models / CHALLENGER_VERSION)
    rows = _lines(no_production_run / "scores")
    assert {r["decision_id"]: r["arm"] for r in rows} == arms
    for row in rows:
        if row["arm"] == "production":
            assert (row["score"], row["model_id"], row["decision"]) == (None, None, 1)
            assert (row["propensity"], row["explored"]) == (1.0, False)
        else:
            assert row["model_id"] == CHALLENGER_ID
            assert row["score"] == pytest.approx(challenger[row["decision_id"]], rel=1e-6, abs=1e-7)
    counters = json.loads((no_production_run / "manifest.json").read_text())["counters"]
    assert counters["score.fallback_decisions"] == list(arms.values()).count("production")


@pytest.mark.slow
def test_a_fallback_decision_is_logged_as_the_client_logs_it(no_production_run, blueprint, events):
    """The client with a challenger and no production scorer: the same event, byte for byte
    (but the time the client stamps)."""
    sink = ListSink()
    client = DecisionClient(blueprint, sink, challenger=lambda f: 0.5, challenger_model_id="x")
    for e in events:
        client.get_decision(e.decision_id, e.features)
    from_client = {
        e.decision_id: e.to_json() for e in sink.events if e.arm == "production"
    }  # fmt: skip
    originals = {e.decision_id: e for e in events}
    logged = {
        d["decision_id"]: d
        for d in _lines(no_production_run / "decisions")
        if d["arm"] == "production"
    }
    assert sorted(logged) == sorted(from_client)
    for decision_id, line in from_client.items():
        client_event = json.loads(line)
        client_event["event_time"] = logged[decision_id]["event_time"]
        assert logged[decision_id] == client_event
        assert "score" not in logged[decision_id] and "model_id" not in logged[decision_id]
        assert (
            originals[decision_id].features
            == parse_decision_json(json.dumps(logged[decision_id]), blueprint).features
        )


@pytest.mark.slow
def test_with_both_aliases_null_every_row_is_the_fallback_decision(no_model_run):
    rows = _lines(no_model_run / "scores")
    assert len(rows) == N
    assert {
        (r["arm"], r["score"], r["model_id"], r["decision"], r["propensity"]) for r in rows
    } == {(None, None, None, 1, 1.0)}
    manifest = json.loads((no_model_run / "manifest.json").read_text())
    assert manifest["arms"] == {"production": None, "challenger": None}
    assert manifest["counters"]["score.fallback_decisions"] == N
    assert _lines(no_model_run / "failed") == []


@pytest.mark.slow
def test_an_explicit_model_version_scores_every_row_with_that_one_model(
    tmp_path, two_models, blueprint, events
):
    out = _run(tmp_path, two_models, events[:60], "--model_version", "challenger")
    expected = _model_scores(events[:60], blueprint, two_models / CHALLENGER_VERSION)
    rows = _lines(out / "scores")
    assert {r["decision_id"] for r in rows} == set(expected)
    for row in rows:
        assert (row["arm"], row["model_id"]) == (None, CHALLENGER_ID)
        assert row["score"] == pytest.approx(expected[row["decision_id"]], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_workers_in_separate_processes_serve_both_arms_as_the_in_process_run(
    two_arm_run, two_models, tmp_path
):
    # As Dataflow runs it: the module is __main__, DoFns run in other processes, and Beam's
    # model manager shares each model between them.
    out = tmp_path / "out"
    done = bulk_score_in_processes(
        _args(two_arm_run.parent / "decisions.jsonl", two_models, out), KEY
    )
    assert done.returncode == 0, done.stderr[-3000:]

    def outcome(directory):
        return {
            r["decision_id"]: (r["arm"], round(r["score"], 6), r["decision"], r["model_id"])
            for r in _lines(directory / "scores")
        }

    assert outcome(out) == outcome(two_arm_run)
    assert "production notify-1793534400, challenger notify-1793538000" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/x.tfrecord", "--input_format", "tfrecord"],
         "assigning arms needs the raw user_id"),
        (["--input", "{tmp}/x.jsonl", "--model_copies", "2"], "--model_copies applies to one model"),
        (["--input", "{tmp}/x.jsonl", "--model_dir", "{serving}/1793534400", "--model_version",
          "rollout"], "not the one version dir"),
    ],
)  # fmt: skip
def test_what_two_arms_cannot_do_exits_with_one_line(
    args, message, two_models, tmp_path, capsys, pii_key
):
    (tmp_path / "x.jsonl").write_text("")
    (tmp_path / "x.tfrecord").write_text("")
    filled = [a.format(tmp=tmp_path, serving=two_models) for a in args]
    base = ["--model_dir", str(two_models), "--blueprint", str(EXAMPLE_BLUEPRINT)]
    assert bulk_score.main([*base, "--output", str(tmp_path / "out"), *filled]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("bulk_score: error:")


@pytest.mark.slow
def test_without_a_rollout_section_production_serves_every_row(
    tmp_path, two_models, blueprint, events
):
    # The decision client refuses a challenger without a rollout section to assign units.
    text = EXAMPLE_BLUEPRINT.read_text()
    no_rollout = tmp_path / "notify.yaml"
    no_rollout.write_text(text[: text.index("\nrollout:")] + "\n")
    out = _run(tmp_path, two_models, events[:60], "--blueprint", str(no_rollout))
    expected = _model_scores(events[:60], blueprint, two_models / PRODUCTION_VERSION)
    rows = _lines(out / "scores")
    assert {r["decision_id"] for r in rows} == set(expected)
    for row in rows:
        assert (row["arm"], row["model_id"]) == (None, PRODUCTION_ID)
        assert row["score"] == pytest.approx(expected[row["decision_id"]], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_the_last_line_names_both_aliases_and_the_fallbacks(tmp_path, blueprint, events, capsys):
    serving = _serving(tmp_path / "serving", blueprint, False, False)
    _run(tmp_path, serving, events[:20])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "bulk_score: production null, challenger null: 20 scored (20 by the fallback decision), "
        "0 refused, 0 failed"
    )
