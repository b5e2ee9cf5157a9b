"""Scoring with the pushed model: serving-model resolution, the RunInference handler, the pure
policy step, ScoreDecisions / ScoreBatches (exact scores, model ids, batching bounds, dead
letters for rows that cannot be encoded and for a model that throws) and WriteScores."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from loopline.events import parse_decision_json
from loopline.examples import features_to_example
from loopline.policy import EpsilonGreedyPolicy, FallbackPolicy, ThresholdPolicy, TopKPolicy
from loopline.registry import ModelNotFound, resolve_serving_model
from loopline.scorer import SavedModelScorer
from tests.scoring_fixtures import export_scoring_model, make_decisions, score_serialized
from transforms.arms import ScoreArms, unit_arm
from transforms.encoding import DecisionEncoder, EncodedDecision
from transforms.inference import ScoreBatches, ScoreDecisions
from transforms.model_handler import SavedModelHandler
from transforms.policy_step import ScoredDecision, decide, decide_arm
from transforms.score_output import WriteScores
from transforms.scoring_failures import ENCODE_FAILED, INFERENCE_FAILED

KEY = b"test-key-not-a-secret"
REPO = Path(__file__).resolve().parent.parent
SCORED_AT = "2026-11-01T12:00:00.000Z"


@pytest.fixture(scope="module")
def serving_dir(tmp_path_factory, blueprint):
    root = tmp_path_factory.mktemp("serving")
    export_scoring_model(blueprint, root / "1700000000", seed=1)
    export_scoring_model(blueprint, root / "1700000100", seed=2)
    return root


@pytest.fixture(scope="module")
def throwing_model(tmp_path_factory, blueprint):
    root = tmp_path_factory.mktemp("throwing")
    export_scoring_model(blueprint, root / "5", fail_on_country="BR")
    return root


@pytest.fixture(scope="module")
def encoder(blueprint):
    return DecisionEncoder(blueprint, KEY)


def _serialized(events, blueprint):
    return [features_to_example(e.features, blueprint, KEY).SerializeToString() for e in events]


def _model_scores(model_dir, events, blueprint) -> dict[str, float]:
    scores = score_serialized(model_dir, _serialized(events, blueprint))
    return {e.decision_id: float(s) for e, s in zip(events, scores, strict=True)}


# The DirectRunner runs bundles in this process (on pickled copies of the DoFns), so outputs
# are collected through this module-level registry rather than through closures.
_COLLECTED: dict[str, list] = {}


def _collect(name: str):
    _COLLECTED[name] = []
    return lambda element: _COLLECTED[name].append(element)


def _run(transform, elements):
    """Runs a scoring transform on the DirectRunner; returns (scored lists, failed, result)."""
    pipeline = beam.Pipeline(runner="DirectRunner")
    outputs = pipeline | "Create" >> beam.Create(elements, reshuffle=False) | "Score" >> transform
    _ = outputs.scored | "CollectScored" >> beam.Map(_collect("scored"))
    _ = outputs.failed | "CollectFailed" >> beam.Map(_collect("failed"))
    result = pipeline.run()
    result.wait_until_finish()
    return _COLLECTED.pop("scored"), _COLLECTED.pop("failed"), result


def _score(events, handler, encoder, policy):
    """ScoreDecisions over keyed events; returns (ScoredDecisions, failed, result)."""
    batches, failed, result = _run(
        ScoreDecisions(handler, encoder, policy), [(e.decision_id, e) for e in events]
    )
    return [s for batch in batches for s in batch], failed, result


def _distribution(result, namespace, name):
    query = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))
    return query["distributions"][0].committed


def _result(decision_id, score, event=None, model_id="notify-1"):
    return decision_id, PredictionResult(EncodedDecision(b"", event), score, model_id)


def test_scoring_resolves_the_production_alias_not_the_newest_version(tmp_path, blueprint):
    export_scoring_model(blueprint, tmp_path / "9", seed=1)
    export_scoring_model(blueprint, tmp_path / "10", seed=2, production=False)  # a challenger
    model = resolve_serving_model(str(tmp_path), "notify")
    assert (model.version, model.model_id) == ("9", "notify-9")
    assert resolve_serving_model(str(tmp_path), "notify", "challenger").version == "10"
    assert resolve_serving_model(str(tmp_path), "notify", "notify-10").version == "10"
    assert resolve_serving_model(str(tmp_path), "notify", "10").model_id == "notify-10"
    assert resolve_serving_model(str(tmp_path / "10"), "notify").model_id == "notify-10"


def test_resolve_serving_model_refuses_missing_versions_and_other_blueprints(
    tmp_path, serving_dir, blueprint
):
    export_scoring_model(blueprint, tmp_path / "1", production=False)  # only a challenger
    with pytest.raises(ModelNotFound, match="has no production model"):
        resolve_serving_model(str(tmp_path), "notify")
    with pytest.raises(ModelNotFound, match="has no model or version 3"):
        resolve_serving_model(str(serving_dir), "notify", "3")
    with pytest.raises(ModelNotFound, match="trained for blueprint 'notify'"):
        resolve_serving_model(str(serving_dir), "churn")


def test_decide_applies_a_row_policy_to_each_row():
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.5, seed=1)
    rows = [_result(f"d-{i}", i / 10) for i in range(10)]
    scored = decide(policy, rows, SCORED_AT)
    choices = [policy.choose(result.inference, decision_id) for decision_id, result in rows]
    assert [(s.decision_id, s.score) for s in scored] == [(d, r.inference) for d, r in rows]
    assert [(s.decision, s.propensity, s.explored) for s in scored] == [
        (c.decision, c.propensity, c.explored) for c in choices
    ]
    assert {(s.model_id, s.scored_at) for s in scored} == {("notify-1", SCORED_AT)}


def test_decide_ranks_the_rows_of_a_top_k_group_together():
    rows = [_result("a", 0.2), _result("b", 0.9), _result("c", 0.5), _result("d", 0.9)]
    assert [s.decision for s in decide(TopKPolicy(k=2), rows, SCORED_AT)] == [0, 1, 0, 1]


def test_decide_on_one_row_is_a_list_of_one(blueprint):
    [event] = make_decisions(blueprint, 1)
    [scored] = decide(ThresholdPolicy(0.5), [_result("d-1", 0.75, event)], SCORED_AT)
    assert (scored.decision, scored.propensity, scored.event) == (1, 1.0, event)


def test_a_scored_decision_logs_its_event_with_the_choice(blueprint):
    [event] = make_decisions(blueprint, 1)
    scored = ScoredDecision("d-1", 0.1, 0, 0.025, True, "notify-7", SCORED_AT, event)
    assert scored.to_decision_event() == replace(
        event, decision=0, propensity=0.025, model_id="notify-7", score=0.1
    )


@pytest.mark.parametrize(
    "decision_id, score, decision, propensity, explored",
    [
        ("d-000001", 0.7310585975646973, 1, 0.975, False),
        ('quote"and\\slash\u00e9\n', 1e-07, 0, 0.025, True),
        ("d-2", 0.0, 0, 1.0, False),
        ("d-3", math.nan, 1, 1.0, False),
    ],
)
def test_to_json_is_exactly_the_json_of_the_output_row(
    decision_id, score, decision, propensity, explored
):
    scored = ScoredDecision(
        decision_id, score, decision, propensity, explored, "notify-1", SCORED_AT
    )
    assert scored.to_json() == json.dumps(scored.to_row(), sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("arm", [None, "production", "challenger"])
def test_a_fallback_rows_json_has_null_score_and_model_and_its_arm(arm):
    scored = ScoredDecision("d-1", None, 1, 1.0, False, None, SCORED_AT, arm=arm)
    line = scored.to_json()
    assert line == json.dumps(scored.to_row(), sort_keys=True, separators=(",", ":"))
    assert (json.loads(line)["score"], json.loads(line)["model_id"], json.loads(line)["arm"]) == (
        None,
        None,
        arm,
    )


def test_decide_arm_falls_back_on_rows_without_a_score_as_the_client_does(blueprint):
    [event] = make_decisions(blueprint, 1)
    rows = [_result("d-1", 0.9, event, model_id="m-c"), _result("d-2", None, event, None)]
    scored = decide_arm(ThresholdPolicy(0.5), FallbackPolicy(1), "production", rows, SCORED_AT)
    assert [(s.score, s.decision, s.propensity, s.model_id, s.arm) for s in scored] == [
        (0.9, 1, 1.0, "m-c", "production"),
        (None, 1, 1.0, None, "production"),
    ]
    assert scored[1].to_decision_event() == event.with_choice(1, 1.0, None, arm="production")


def test_score_arms_scores_each_arm_with_its_model_in_one_run_inference(
    serving_dir, blueprint, encoder
):
    """ScoreArms on a TestPipeline: production and challenger models behind one RunInference,
    each row scored by the model of its unit's arm."""
    events = make_decisions(blueprint, 80, seed=9)
    models = {
        "production": resolve_serving_model(serving_dir, "notify", "1700000000"),
        "challenger": resolve_serving_model(serving_dir, "notify", "1700000100"),
    }
    scores = {arm: _model_scores(m.path, events, blueprint) for arm, m in models.items()}
    expected = []
    for e in events:
        arm = unit_arm(e.features, blueprint.rollout)
        score = scores[arm][e.decision_id]
        expected.append((e.decision_id, arm, models[arm].model_id, score, int(score >= 0.5)))
    assert {row[1] for row in expected} == {"production", "challenger"}
    handlers = {arm: SavedModelHandler(m) for arm, m in models.items()}
    transform = ScoreArms(
        handlers, encoder, ThresholdPolicy(0.5), FallbackPolicy(1), blueprint.rollout
    )

    def matches(actual):
        assert sorted(r[:3] + r[4:] for r in actual) == sorted(r[:3] + r[4:] for r in expected)
        by_id = {r[0]: r[3] for r in expected}
        for row in actual:
            assert row[3] == pytest.approx(by_id[row[0]], rel=1e-6, abs=1e-7)

    with test_pipeline.TestPipeline() as p:
        batches = p | beam.Create([[(e.decision_id, e) for e in events[:50]],
                                   [(e.decision_id, e) for e in events[50:]]])  # fmt: skip
        outputs = batches | transform
        rows = outputs.scored | beam.FlatMap(
            lambda batch: [(s.decision_id, s.arm, s.model_id, s.score, s.decision) for s in batch]
        )
        assert_that(rows, matches, label="ScoredByArm")
        assert_that(outputs.failed, equal_to([]), label="NoneFailed")


def test_a_challenger_that_throws_fails_only_its_arms_rows(
    serving_dir, throwing_model, blueprint, encoder
):
    events = make_decisions(blueprint, 60, seed=12)
    arms = {e.decision_id: unit_arm(e.features, blueprint.rollout) for e in events}
    challenger_rows = [e for e in events if arms[e.decision_id] == "challenger"]
    assert any(e.features["country"] == "BR" for e in challenger_rows)  # the model refuses BR
    handlers = {
        "production": SavedModelHandler(resolve_serving_model(serving_dir, "notify", "1700000000")),
        "challenger": SavedModelHandler(resolve_serving_model(throwing_model, "notify", "5")),
    }
    transform = ScoreArms(
        handlers, encoder, ThresholdPolicy(0.5), FallbackPolicy(1), blueprint.rollout
    )
    with test_pipeline.TestPipeline() as p:
        outputs = p | beam.Create([[(e.decision_id, e) for e in events]]) | transform
        scored = outputs.scored | beam.FlatMap(lambda batch: [s.decision_id for s in batch])
        failed = outputs.failed | beam.Map(lambda f: (f.decision_id, f.reason))
        production = [d for d, arm in arms.items() if arm == "production"]
        assert_that(scored, equal_to(production), label="ProductionScored")
        expected_failed = [(e.decision_id, INFERENCE_FAILED) for e in challenger_rows]
        assert_that(failed, equal_to(expected_failed), label="ChallengerFailed")


def test_score_arms_without_a_production_model_gives_its_arm_the_fallback(
    serving_dir, blueprint, encoder
):
    events = make_decisions(blueprint, 40, seed=10)
    challenger = resolve_serving_model(serving_dir, "notify", "1700000100")
    expected = sorted(
        (e.decision_id, arm, None if arm == "production" else challenger.model_id)
        for e in events
        for arm in [unit_arm(e.features, blueprint.rollout)]
    )
    transform = ScoreArms(
        {"challenger": SavedModelHandler(challenger)},
        encoder,
        ThresholdPolicy(0.5),
        FallbackPolicy(1),
        blueprint.rollout,
    )
    with test_pipeline.TestPipeline() as p:
        outputs = p | beam.Create([[(e.decision_id, e) for e in events]]) | transform
        fallback = outputs.scored | "Fallback" >> beam.FlatMap(
            lambda batch: [(s.score, s.decision, s.propensity) for s in batch if s.model_id is None]
        )
        arms = outputs.scored | "Arms" >> beam.FlatMap(
            lambda batch: [(s.decision_id, s.arm, s.model_id) for s in batch]
        )
        assert_that(arms, equal_to(expected), label="Arms")
        production = [row for row in expected if row[1] == "production"]
        assert_that(fallback, equal_to([(None, 1, 1.0)] * len(production)), label="Fallback")


def test_handler_counts_the_bytes_of_the_examples_it_scores(serving_dir, blueprint):
    handler = SavedModelHandler(resolve_serving_model(str(serving_dir), blueprint.name))
    batch = [EncodedDecision(b"abc", None), EncodedDecision(b"\x00" * 10, None)]
    assert handler.get_num_bytes(batch) == 13


def test_handler_exposes_batching_and_sharing_settings(serving_dir, blueprint):
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = SavedModelHandler(
        model,
        min_batch_size=8,
        max_batch_size=64,
        target_batch_duration_secs=0.5,
        model_copies=2,
    )
    assert handler.batch_elements_kwargs() == {
        "min_batch_size": 8,
        "max_batch_size": 64,
        "target_batch_duration_secs": 0.5,
    }
    assert (handler.share_model_across_processes(), handler.model_copies()) == (True, 2)
    assert SavedModelHandler(model, large_model=True).share_model_across_processes()
    plain = SavedModelHandler(model)
    assert (plain.share_model_across_processes(), plain.model_copies()) == (False, 1)
    assert plain.get_metrics_namespace() == "loopline.inference"
    with pytest.raises(ValueError, match="larger than max_batch_size"):
        SavedModelHandler(model, min_batch_size=10, max_batch_size=5)
    with pytest.raises(ValueError, match="device"):
        SavedModelHandler(model, device="TPU")


def test_the_garbage_collector_is_frozen_by_loading_the_model_not_by_imports(serving_dir):
    # In a fresh process: this one's heap must not be frozen by the test.
    script = (
        "import gc, sys\n"
        "import transforms.inference, transforms.model_handler as h, loopline.registry as s\n"
        "assert gc.get_freeze_count() == 0, 'frozen on import'\n"
        "h.SavedModelHandler(s.resolve_serving_model(sys.argv[1], 'notify')).load_model()\n"
        "assert gc.get_freeze_count() > 0, 'not frozen by load_model'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(serving_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_scores_equal_the_models_own_outputs_with_the_model_id(serving_dir, blueprint, encoder):
    events = make_decisions(blueprint, 120, seed=4)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = SavedModelHandler(model, min_batch_size=10, max_batch_size=25)
    scored, failed, result = _score(events, handler, encoder, ThresholdPolicy(0.5))

    assert failed == []
    expected = _model_scores(model.path, events, blueprint)
    by_id = {s.decision_id: s for s in scored}
    assert sorted(by_id) == sorted(expected)
    for event in events:
        got = by_id[event.decision_id]
        # Batches differ from the reference call; float32 matmuls may differ in the last bit.
        assert got.score == pytest.approx(expected[event.decision_id], rel=1e-6, abs=1e-7)
        assert got.decision == int(got.score >= 0.5)
        assert (got.model_id, got.propensity, got.event) == ("notify-1700000100", 1.0, event)
    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert (sizes.sum, sizes.max <= 25) == (120, True)


def test_batch_size_bounds_are_honoured_exactly_when_fixed(serving_dir, blueprint, encoder):
    events = make_decisions(blueprint, 64, seed=5)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = SavedModelHandler(model, min_batch_size=16, max_batch_size=16)
    scored, _, result = _score(events, handler, encoder, ThresholdPolicy(0.5))
    assert len(scored) == 64
    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert (sizes.min, sizes.max, sizes.sum) == (16, 16, 64)


def test_rows_that_cannot_be_encoded_reach_the_dead_letter_output(serving_dir, blueprint, encoder):
    events = make_decisions(blueprint, 20, seed=6)
    broken = replace(
        events[3], features={k: v for k, v in events[3].features.items() if k != "country"}
    )
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = SavedModelHandler(model, max_batch_size=8)
    scored, failed, _ = _score(
        [*events[:3], broken, *events[4:]], handler, encoder, ThresholdPolicy()
    )

    assert len(scored) == 19
    assert [(f.reason, f.decision_id, f.step) for f in failed] == [
        (ENCODE_FAILED, broken.decision_id, "EncodeDecisions")
    ]
    assert "country" in failed[0].detail
    assert broken.decision_id in failed[0].payload


def test_a_model_that_throws_sends_its_batches_to_dead_letters(throwing_model, blueprint, encoder):
    events = make_decisions(blueprint, 60, seed=7)
    poisoned = {e.decision_id for e in events if e.features["country"] == "BR"}
    assert poisoned  # the seed gives some rows the model refuses
    model = resolve_serving_model(str(throwing_model), blueprint.name)
    handler = SavedModelHandler(model, min_batch_size=4, max_batch_size=4)
    scored, failed, _ = _score(events, handler, encoder, ThresholdPolicy())

    failed_ids = {f.decision_id for f in failed}
    assert poisoned <= failed_ids
    assert failed_ids.isdisjoint(s.decision_id for s in scored)
    assert len(failed_ids) + len(scored) == 60
    assert len(scored) > 0
    assert {f.reason for f in failed} == {INFERENCE_FAILED}
    assert all("model refuses country BR" in f.detail for f in failed)


def test_epsilon_greedy_policy_is_applied_with_its_propensities(serving_dir, blueprint, encoder):
    events = make_decisions(blueprint, 200, seed=8)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.3, seed=3)
    scored, _, _ = _score(events, SavedModelHandler(model), encoder, policy)
    for s in scored:
        assert (s.decision, s.propensity, s.explored) == tuple(
            vars(policy.choose(s.score, s.decision_id)).values()
        )
    assert any(s.explored for s in scored)


def test_top_k_is_exact_within_each_group(serving_dir, blueprint, encoder):
    events = make_decisions(blueprint, 90, seed=9)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = TopKPolicy(k=2, group_feature="platform")
    handler = SavedModelHandler(model, max_batch_size=16)
    scored, _, _ = _score(events, handler, encoder, policy)
    assert len(scored) == 90
    platform = {e.decision_id: e.features["platform"] for e in events}
    for group in set(platform.values()):
        members = [s for s in scored if platform[s.decision_id] == group]
        top = sorted(members, key=lambda s: (-s.score, s.decision_id))[:2]
        assert {s.decision_id for s in members if s.decision == 1} == {s.decision_id for s in top}


def _batches(events, size=10):
    keyed = [(e.decision_id, e) for e in events]
    return [keyed[i : i + size] for i in range(0, len(keyed), size)]


def test_each_pre_formed_batch_is_one_model_call_and_one_scored_list(
    serving_dir, blueprint, encoder
):
    events = make_decisions(blueprint, 45, seed=12)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    transform = ScoreBatches(SavedModelHandler(model), encoder, ThresholdPolicy())
    scored, failed, result = _run(transform, _batches(events))

    assert failed == []
    assert sorted(len(batch) for batch in scored) == [5, 10, 10, 10, 10]
    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert (sizes.count, sizes.sum, sizes.max, sizes.min) == (5, 45, 10, 5)
    want = _model_scores(model.path, events, blueprint)
    for s in (s for batch in scored for s in batch):
        assert s.score == pytest.approx(want[s.decision_id], rel=1e-6, abs=1e-7)


def test_a_model_that_throws_fails_exactly_its_pre_formed_batches(
    throwing_model, blueprint, encoder
):
    events = make_decisions(blueprint, 45, seed=12)
    batches = _batches(events)
    poisoned = [b for b in batches if any(e.features["country"] == "BR" for _, e in b)]
    assert 0 < len(poisoned) < len(batches)
    model = resolve_serving_model(str(throwing_model), blueprint.name)
    transform = ScoreBatches(SavedModelHandler(model), encoder, ThresholdPolicy())
    scored, failed, _ = _run(transform, batches)

    assert {f.decision_id for f in failed if f.reason == INFERENCE_FAILED} == {
        d for b in poisoned for d, _ in b
    }
    assert sum(map(len, scored)) + len(failed) == 45


@pytest.fixture(scope="module")
def written(tmp_path_factory, serving_dir, blueprint, encoder):
    """ScoreBatches then WriteScores(log_decisions=True) into a directory, run once."""
    events = make_decisions(blueprint, 30, seed=11)
    out = tmp_path_factory.mktemp("written")
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.5, seed=1)
    pipeline = beam.Pipeline(runner="DirectRunner")
    scored = (
        pipeline
        | beam.Create(_batches(events), reshuffle=False)
        | ScoreBatches(SavedModelHandler(model), encoder, policy)
    ).scored
    _ = scored | WriteScores(str(out), log_decisions=True)
    pipeline.run().wait_until_finish()
    read = {
        name: [json.loads(line) for f in (out / name).glob("*.jsonl") for line in f.open()]
        for name in ("scores", "decisions")
    }
    return events, policy, read["scores"], read["decisions"]


def test_written_score_lines_hold_each_scored_decision_once(written):
    events, policy, rows, _ = written
    assert sorted(r["decision_id"] for r in rows) == sorted(e.decision_id for e in events)
    for row in rows:
        choice = policy.choose(row["score"], row["decision_id"])
        assert (row["decision"], row["propensity"], row["explored"]) == (
            choice.decision,
            choice.propensity,
            choice.explored,
        )


def test_written_decision_events_carry_the_choice_the_score_and_the_original_features(
    written, blueprint
):
    events, _, rows, logged = written
    by_id = {r["decision_id"]: r for r in rows}
    originals = {e.decision_id: e for e in events}
    assert sorted(by_id) == sorted(d["decision_id"] for d in logged)
    for line in logged:
        event = parse_decision_json(json.dumps(line), blueprint)
        row = by_id[event.decision_id]
        assert event == originals[event.decision_id].with_choice(
            row["decision"], row["propensity"], row["model_id"], score=row["score"]
        )


def test_saved_model_scorer_matches_the_model(serving_dir, blueprint):
    events = make_decisions(blueprint, 5, seed=10)
    scorer = SavedModelScorer(str(serving_dir), blueprint, KEY, version="1700000000")
    assert scorer.model_id == "notify-1700000000"
    expected = score_serialized(scorer.serving_model.path, _serialized(events, blueprint))
    for event, want in zip(events, expected, strict=True):
        assert scorer(event.features) == pytest.approx(float(want), rel=1e-6)
