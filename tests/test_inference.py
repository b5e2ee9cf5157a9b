"""The RunInference model handler and ScoreDecisions: exact scores, model ids, batching bounds,
dead letters for rows that cannot be encoded and for a model that throws."""

import json
import math
from dataclasses import replace

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter

from loopline.policy import Choice, EpsilonGreedyPolicy, ThresholdPolicy, TopKPolicy
from tests.scoring_fixtures import export_scoring_model, make_decisions, score_serialized
from transforms.examples import features_to_example
from transforms.inference import (
    ENCODE_FAILED,
    INFERENCE_FAILED,
    ModelNotFound,
    SavedModelHandler,
    SavedModelScorer,
    ScoreBatches,
    ScoredDecision,
    ScoreDecisions,
    decision_model_handler,
    resolve_serving_model,
    row_json,
)

KEY = b"test-key-not-a-secret"


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


def _serialized(events, blueprint):
    return [features_to_example(e.features, blueprint, KEY).SerializeToString() for e in events]


# The DirectRunner runs bundles in this process (on pickled copies of the DoFns), so outputs
# are collected through this module-level registry rather than through closures.
_COLLECTED: dict[str, list] = {}


def _collect(name: str):
    _COLLECTED[name] = []
    return lambda element: _COLLECTED[name].append(element)


def _run(events, handler, policy):
    """Runs ScoreDecisions on the DirectRunner; returns (scored, failed, metrics result)."""
    pipeline = beam.Pipeline(runner="DirectRunner")
    outputs = (
        pipeline
        | "Create" >> beam.Create([(e.decision_id, e) for e in events])
        | "Score" >> ScoreDecisions(handler, policy)
    )
    _ = outputs.scored | "CollectScored" >> beam.Map(_collect("scored"))
    _ = outputs.failed | "CollectFailed" >> beam.Map(_collect("failed"))
    result = pipeline.run()
    result.wait_until_finish()
    return _COLLECTED.pop("scored"), _COLLECTED.pop("failed"), result


def _distribution(result, namespace, name):
    query = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))
    return query["distributions"][0].committed


def test_resolve_serving_model_picks_the_largest_integer_version(tmp_path, blueprint):
    for name in ("9", "10", "latest", "11.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(b"")
    model = resolve_serving_model(str(tmp_path), "notify")
    assert (model.version, model.model_id) == ("10", "notify-10")
    assert resolve_serving_model(str(tmp_path), "notify", "9").model_id == "notify-9"
    assert resolve_serving_model(str(tmp_path / "9"), "notify").model_id == "notify-9"


def test_resolve_serving_model_refuses_missing_versions_and_other_blueprints(tmp_path, serving_dir):
    with pytest.raises(ModelNotFound, match="no pushed version"):
        resolve_serving_model(str(tmp_path), "notify")
    with pytest.raises(ModelNotFound, match="no version 3"):
        resolve_serving_model(str(serving_dir), "notify", "3")
    with pytest.raises(ModelNotFound, match="trained for blueprint 'notify'"):
        resolve_serving_model(str(serving_dir), "churn")


def test_scores_equal_the_models_own_outputs_with_the_model_id(serving_dir, blueprint):
    events = make_decisions(blueprint, 120, seed=4)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = decision_model_handler(model, blueprint, KEY, min_batch_size=10, max_batch_size=25)
    scored, failed, result = _run(events, handler, ThresholdPolicy(0.5))

    assert failed == []
    expected = score_serialized(model.path, _serialized(events, blueprint))
    by_id = {s.decision_id: s for s in scored}
    assert sorted(by_id) == [e.decision_id for e in events]
    for event, want in zip(events, expected, strict=True):
        got = by_id[event.decision_id]
        # Batches differ from the reference call; float32 matmuls may differ in the last bit.
        assert got.score == pytest.approx(float(want), rel=1e-6, abs=1e-7)
        assert got.decision == int(got.score >= 0.5)
        assert (got.model_id, got.propensity, got.event) == ("notify-1700000100", 1.0, event)

    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert sizes.sum == 120
    assert sizes.max <= 25
    assert sizes.count >= 120 // 25


def test_batch_size_bounds_are_honoured_exactly_when_fixed(serving_dir, blueprint):
    events = make_decisions(blueprint, 64, seed=5)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = decision_model_handler(model, blueprint, KEY, min_batch_size=16, max_batch_size=16)
    scored, _, result = _run(events, handler, ThresholdPolicy(0.5))
    assert len(scored) == 64
    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert (sizes.min, sizes.max, sizes.sum) == (16, 16, 64)


def test_rows_that_cannot_be_encoded_reach_the_dead_letter_output(serving_dir, blueprint):
    events = make_decisions(blueprint, 20, seed=6)
    broken = replace(
        events[3], features={k: v for k, v in events[3].features.items() if k != "country"}
    )
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    handler = decision_model_handler(model, blueprint, KEY, max_batch_size=8)
    scored, failed, _ = _run([*events[:3], broken, *events[4:]], handler, ThresholdPolicy())

    assert len(scored) == 19
    assert [(f.reason, f.decision_id, f.step) for f in failed] == [
        (ENCODE_FAILED, broken.decision_id, "EncodeDecision")
    ]
    assert "country" in failed[0].detail
    assert broken.decision_id in failed[0].payload


def test_a_model_that_throws_sends_its_batches_to_dead_letters(throwing_model, blueprint):
    events = make_decisions(blueprint, 60, seed=7)
    poisoned = {e.decision_id for e in events if e.features["country"] == "BR"}
    assert poisoned  # the seed gives some rows the model refuses
    model = resolve_serving_model(str(throwing_model), blueprint.name)
    handler = decision_model_handler(model, blueprint, KEY, min_batch_size=4, max_batch_size=4)
    scored, failed, _ = _run(events, handler, ThresholdPolicy())

    failed_ids = {f.decision_id for f in failed}
    assert poisoned <= failed_ids
    assert failed_ids.isdisjoint(s.decision_id for s in scored)
    assert len(failed_ids) + len(scored) == 60
    assert len(scored) > 0
    assert {f.reason for f in failed} == {INFERENCE_FAILED}
    assert all("model refuses country BR" in f.detail for f in failed)


def test_epsilon_greedy_policy_is_applied_with_its_propensities(serving_dir, blueprint):
    events = make_decisions(blueprint, 200, seed=8)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.3, seed=3)
    scored, _, _ = _run(events, decision_model_handler(model, blueprint, KEY), policy)
    for s in scored:
        assert (s.decision, s.propensity, s.explored) == tuple(
            vars(policy.choose(s.score, s.decision_id)).values()
        )
    assert any(s.explored for s in scored)


def test_top_k_is_exact_within_each_group(serving_dir, blueprint):
    events = make_decisions(blueprint, 90, seed=9)
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = TopKPolicy(k=2, group_feature="platform")
    scored, _, _ = _run(events, decision_model_handler(model, blueprint, KEY), policy)
    platform = {e.decision_id: e.features["platform"] for e in events}
    for group in set(platform.values()):
        members = [s for s in scored if platform[s.decision_id] == group]
        top = sorted(members, key=lambda s: (-s.score, s.decision_id))[:2]
        assert {s.decision_id for s in members if s.decision == 1} == {s.decision_id for s in top}


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


def test_saved_model_scorer_matches_the_model(serving_dir, blueprint):
    events = make_decisions(blueprint, 5, seed=10)
    scorer = SavedModelScorer(str(serving_dir), blueprint, KEY, version="1700000000")
    assert scorer.model_id == "notify-1700000000"
    expected = score_serialized(scorer.serving_model.path, _serialized(events, blueprint))
    for event, want in zip(events, expected, strict=True):
        assert scorer(event.features) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(
    "decision_id, score, choice",
    [
        ("d-000001", 0.7310585975646973, Choice(1, 0.975, False)),
        ('quote"and\\slash\u00e9\n', 1e-07, Choice(0, 0.025, True)),
        ("d-2", 0.0, Choice(0, 1.0, False)),
        ("d-3", math.nan, Choice(1, 1.0, False)),
    ],
)
def test_row_json_is_exactly_the_json_of_the_output_row(decision_id, score, choice):
    scored = ScoredDecision(
        decision_id, score, choice.decision, choice.propensity, choice.explored, "notify-1",
        "2026-11-01T12:00:00.000Z",
    )  # fmt: skip
    want = json.dumps(scored.to_row(), sort_keys=True, separators=(",", ":"))
    assert row_json(decision_id, score, choice, "notify-1", scored.scored_at) == want


def test_json_rows_and_logged_decisions_come_from_the_fused_policy_step(serving_dir, blueprint):
    events = make_decisions(blueprint, 40, seed=11)
    broken = replace(events[0], features={**events[0].features, "country": None})
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.5, seed=1)
    pipeline = beam.Pipeline(runner="DirectRunner")
    outputs = (
        pipeline
        | beam.Create([(e.decision_id, e) for e in [broken, *events[1:]]])
        | ScoreDecisions(
            decision_model_handler(model, blueprint, KEY, min_batch_size=8, max_batch_size=8),
            policy,
            json_rows=True,
            log_decisions=True,
        )
    )
    _ = outputs.scored | "CollectScored" >> beam.Map(_collect("rows"))
    _ = outputs.logged | "CollectLogged" >> beam.Map(_collect("logged"))
    _ = outputs.failed | "CollectFailed" >> beam.Map(_collect("failed"))
    pipeline.run().wait_until_finish()
    rows = [json.loads(r) for r in _COLLECTED.pop("rows")]
    logged = {d["decision_id"]: d for d in map(json.loads, _COLLECTED.pop("logged"))}
    failed = _COLLECTED.pop("failed")

    # The row with an unencodable feature fails alone; the rest of its batch is scored.
    assert [(f.reason, f.decision_id) for f in failed] == [(ENCODE_FAILED, broken.decision_id)]
    expected = score_serialized(model.path, _serialized(events[1:], blueprint))
    want = {e.decision_id: float(s) for e, s in zip(events[1:], expected, strict=True)}
    assert sorted(r["decision_id"] for r in rows) == sorted(want) == sorted(logged)
    for row in rows:
        assert row["score"] == pytest.approx(want[row["decision_id"]], rel=1e-6, abs=1e-7)
        choice = policy.choose(row["score"], row["decision_id"])
        assert (row["decision"], row["propensity"], row["explored"]) == (
            choice.decision,
            choice.propensity,
            choice.explored,
        )
        event = logged[row["decision_id"]]
        assert (event["decision"], event["propensity"], event["model_id"]) == (
            row["decision"],
            row["propensity"],
            "notify-1700000100",
        )


def _run_batches(batches, handler, policy, name):
    pipeline = beam.Pipeline(runner="DirectRunner")
    outputs = (
        pipeline
        | f"Create{name}" >> beam.Create(batches, reshuffle=False)
        | f"Score{name}" >> ScoreBatches(handler, policy, log_decisions=True)
    )
    _ = outputs.scored | "CollectScored" >> beam.Map(_collect("rows"))
    _ = outputs.logged | "CollectLogged" >> beam.Map(_collect("logged"))
    _ = outputs.failed | "CollectFailed" >> beam.Map(_collect("failed"))
    result = pipeline.run()
    result.wait_until_finish()
    # Each scored/logged element is a whole batch's lines.
    rows = [json.loads(line) for block in _COLLECTED.pop("rows") for line in block.split("\n")]
    logged = [json.loads(line) for block in _COLLECTED.pop("logged") for line in block.split("\n")]
    return rows, logged, _COLLECTED.pop("failed"), result


def test_pre_batched_scoring_matches_row_scoring_with_per_row_and_per_batch_dead_letters(
    serving_dir, throwing_model, blueprint
):
    events = make_decisions(blueprint, 45, seed=12)
    broken = replace(events[0], features={**events[0].features, "country": None})
    keyed = [(e.decision_id, e) for e in [broken, *events[1:]]]
    batches = [keyed[i : i + 10] for i in range(0, len(keyed), 10)]
    model = resolve_serving_model(str(serving_dir), blueprint.name)
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.5, seed=1)
    rows, logged, failed, result = _run_batches(
        batches, decision_model_handler(model, blueprint, KEY), policy, "Good"
    )

    assert [(f.reason, f.decision_id) for f in failed] == [(ENCODE_FAILED, broken.decision_id)]
    expected = score_serialized(model.path, _serialized(events[1:], blueprint))
    want = {e.decision_id: float(s) for e, s in zip(events[1:], expected, strict=True)}
    assert sorted(r["decision_id"] for r in rows) == sorted(want)
    for row in rows:
        assert row["score"] == pytest.approx(want[row["decision_id"]], rel=1e-6, abs=1e-7)
        choice = policy.choose(row["score"], row["decision_id"])
        assert (row["decision"], row["propensity"], row["explored"], row["model_id"]) == (
            choice.decision,
            choice.propensity,
            choice.explored,
            "notify-1700000100",
        )
    assert {d["decision_id"]: (d["decision"], d["propensity"]) for d in logged} == {
        r["decision_id"]: (r["decision"], r["propensity"]) for r in rows
    }
    # RunInference's metrics count rows: one model batch per pre-formed batch.
    sizes = _distribution(result, "loopline.inference", "inference_request_batch_size")
    assert (sizes.count, sizes.sum, sizes.max, sizes.min) == (5, 45, 10, 5)

    # A model that throws fails exactly its batches (all their rows), row by row.
    model = resolve_serving_model(str(throwing_model), blueprint.name)
    poisoned_batches = [b for b in batches if any(e.features["country"] == "BR" for _, e in b)]
    assert 0 < len(poisoned_batches) < len(batches)
    rows, _, failed, _ = _run_batches(
        batches, decision_model_handler(model, blueprint, KEY), ThresholdPolicy(), "Throwing"
    )
    inference_failed = {f.decision_id for f in failed if f.reason == INFERENCE_FAILED}
    assert inference_failed == {d for b in poisoned_batches for d, _ in b}
    assert len(rows) + len(failed) == 45
