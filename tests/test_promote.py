"""python -m pipelines.promote: each verdict's move, on a local serving dir and on gs://."""

import json
import uuid

import pytest

from loopline import registry, storage
from pipelines import promote
from pipelines.launch import parse_flags
from tests.fake_gcs import root_for

REGISTERED_AT = "2026-11-01T06:00:00+00:00"


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, monkeypatch):
    """Holds the serving dir (``serving``) and the verdict file, locally and on the fake GCS."""
    return root_for(request.param, tmp_path, monkeypatch)


def push(root, version: str, replace_challenger=False) -> str:
    """A blessed push registered (as the challenger) on REGISTERED_AT; returns its model id."""
    serving = root.local / "serving"
    (serving / version).mkdir(parents=True)
    (serving / version / "saved_model.pb").write_bytes(b"placeholder")
    record = {"model_id": str(uuid.uuid4()), "name": f"notify-{version}", "version": version}
    record |= {"blessed": True, "pushed": True, "blueprint": {"name": "notify"}}
    (serving / f"{version}.record.json").write_text(json.dumps(record))
    registry.register(root / "serving", record, REGISTERED_AT, replace_challenger)
    return record["model_id"]


def verdict(root, challenger, verdict="challenger_better", **fields) -> str:
    document = {"verdict": verdict, "challenger": challenger, **fields}
    (root.local / "verdict.json").write_text(json.dumps(document))
    return root / "verdict.json"


def promote_run(root, verdict_path, *extra) -> int:
    return promote.main(["--serving_dir", root / "serving", "--verdict", verdict_path, *extra])


def aliases(root):
    return registry.read_aliases(root / "serving")


def test_a_better_challenger_is_promoted_to_production(root, capsys):
    model = push(root, "100")
    assert promote_run(root, verdict(root, model, summary="ctr +1.2%, p=0.003")) == 0
    assert (aliases(root).production, aliases(root).challenger) == (model, None)
    assert capsys.readouterr().out.startswith(f"promote: promoted {model} to production")


def test_promotion_moves_the_old_production_to_previous(root):
    old = push(root, "100")
    registry.promote(root / "serving", "beat the fallback")
    new = push(root, "200")
    assert promote_run(root, verdict(root, new)) == 0
    assert (aliases(root).production, aliases(root).previous) == (new, old)


def test_a_worse_challenger_is_rolled_back_and_production_keeps_serving(root, capsys):
    old = push(root, "100")
    registry.promote(root / "serving", "beat the fallback")
    new = push(root, "200")
    assert promote_run(root, verdict(root, new, "challenger_worse")) == 0
    assert (aliases(root).production, aliases(root).challenger) == (old, None)
    assert capsys.readouterr().out.startswith(f"promote: rolled back {new}")


def test_a_fired_flag_rolls_back_even_a_better_challenger(root):
    model = push(root, "100")
    assert promote_run(root, verdict(root, model, flags=["guardrail dwell_seconds"])) == 0
    assert (aliases(root).production, aliases(root).challenger) == (None, None)
    assert "flags fired: guardrail dwell_seconds" in aliases(root).history[-1]["why"]


def test_inconclusive_keeps_the_split_before_max_days(root, capsys):
    model = push(root, "100")
    readout = verdict(root, model, "inconclusive", at="2026-11-05T06:00:00Z")
    assert promote_run(root, readout, "--max_days", "14") == 0
    assert aliases(root).challenger == model and len(aliases(root).history) == 1
    assert "promote: no change (inconclusive after 4.0 of 14 days" in capsys.readouterr().out


def test_inconclusive_past_max_days_is_rolled_back_saying_so(root):
    model = push(root, "100")
    readout = verdict(root, model, "inconclusive", at="2026-11-15T06:00:00Z")
    assert promote_run(root, readout, "--max_days", "14") == 0
    assert aliases(root).challenger is None
    why = aliases(root).history[-1]["why"]
    assert "still inconclusive after 14.0 days in traffic (--max_days 14)" in why


def test_an_invalid_verdict_moves_nothing_and_exits_1(root, capsys):
    model = push(root, "100")
    before = (root.local / "serving" / "aliases.json").read_bytes()
    assert promote_run(root, verdict(root, model, "invalid: sample ratio mismatch")) == 1
    assert (root.local / "serving" / "aliases.json").read_bytes() == before
    err = capsys.readouterr().err
    assert err.startswith("promote: error: no change (invalid: sample ratio mismatch")
    assert "needs a person" in err and err.count("\n") == 1


def test_a_verdict_about_a_replaced_challenger_moves_nothing(root, capsys):
    old = push(root, "100")
    new = push(root, "200", replace_challenger=True)  # replaced after the monitor read out
    assert promote_run(root, verdict(root, old)) == 0
    assert (aliases(root).production, aliases(root).challenger) == (None, new)
    assert "a stale verdict moves nothing" in capsys.readouterr().out


def test_no_challenger_in_traffic_moves_nothing(root):
    model = push(root, "100")
    registry.roll_back(root / "serving", "by hand")
    assert promote_run(root, verdict(root, model)) == 0
    assert (aliases(root).production, aliases(root).challenger) == (None, None)


def test_every_move_is_in_history_with_the_verdicts_reason(root):
    model = push(root, "100")
    promote_run(root, verdict(root, model, summary="ctr +1.2%, p=0.003"))
    moves = [(m["alias"], m["to"], m["why"]) for m in aliases(root).history[1:]]
    reason = "challenger_better (ctr +1.2%, p=0.003)"
    assert moves == [
        ("production", model, f"promoted: {reason}"),
        ("challenger", None, f"promoted to production: {reason}"),
    ]


def test_a_newer_push_after_the_verdict_was_read_is_not_promoted(root):
    model = push(root, "100")
    argv = ["--serving_dir", root / "serving", "--verdict", verdict(root, model)]
    config = promote.resolve(parse_flags(argv, promote.PromoteOptions, promote.PROG)[0])
    decision = promote.decide(config.aliases, config.verdict, config.max_days)
    newer = push(root, "200", replace_challenger=True)
    with pytest.raises(storage.ConcurrentUpdate, match="nothing was moved"):
        promote.apply(config, decision)
    assert (aliases(root).production, aliases(root).challenger) == (None, newer)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--serving_dir", "{serving}", "--verdict", "{root}/missing.json"], "cannot read"),
        (["--serving_dir", "{root}/nowhere", "--verdict", "{verdict}"], "does not exist"),
        (["--serving_dir", "{serving}"], "one of the arguments --verdict --roll_back is required"),
        (
            ["--serving_dir", "{serving}", "--verdict", "{verdict}", "--max_day", "3"],
            "unknown argument '--max_day'",
        ),
        (
            ["--serving_dir", "{serving}", "--verdict", "{verdict}", "--max", "3"],
            "unknown argument '--max'",
        ),
        (
            ["--serving_dir", "{serving}", "--verdict", "{verdict}", "--runner=DirectRunner"],
            "unknown argument '--runner=DirectRunner'",
        ),
        (
            ["--serving_dir", "{serving}", "--verdict", "{verdict}", "--max_days", "two"],
            "argument --max_days: invalid float value: 'two'",
        ),
        (["--serving_dir", "{serving}", "--verdict", "{verdict}", "--max_days", "0"], "positive"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(root, capsys, argv, message):
    push(root, "100")
    path = verdict(root, "m")
    names = {"root": root.uri, "serving": root / "serving", "verdict": path}
    assert promote.main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promote: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not readable JSON"),
        ('["challenger_better"]', "is not a JSON object"),
        ('{"verdict": "great", "challenger": "m"}', "'verdict' must be one of"),
        ('{"verdict": "challenger_better"}', "'challenger' must name a model id"),
        ('{"verdict": "inconclusive", "challenger": "m", "flags": "srm"}', "'flags' must be"),
        ('{"verdict": "inconclusive", "challenger": "m", "at": "today"}', "not an RFC 3339"),
    ],
)
def test_a_malformed_verdict_exits_2_naming_what_is_wrong(root, capsys, content, message):
    push(root, "100")
    (root.local / "verdict.json").write_text(content)
    assert promote_run(root, root / "verdict.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("promote: error: ") and message in err


def test_rolling_back_the_challenger_by_hand_keeps_the_reason(root, capsys):
    production = push(root, "100")
    registry.promote(root / "serving", "better")
    challenger = push(root, "200")
    argv = ["--serving_dir", root / "serving", "--roll_back", "challenger", "--why", "INC-123"]
    assert promote.main(argv) == 0
    assert (aliases(root).production, aliases(root).challenger) == (production, None)
    assert aliases(root).history[-1]["why"] == "rolled back: by hand: INC-123"
    assert f"rolled back challenger {challenger}" in capsys.readouterr().out


def test_rolling_back_production_by_hand_restores_the_previous_model(root):
    old = push(root, "100")
    registry.promote(root / "serving", "better")
    push(root, "200")
    registry.promote(root / "serving", "better")
    argv = ["--serving_dir", root / "serving", "--roll_back", "production", "--why", "INC-124"]
    assert promote.main(argv) == 0
    assert aliases(root).production == old


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--roll_back", "challenger"], "--roll_back needs --why"),
        (["--roll_back", "production", "--why", "x"], "no previous model to roll back to"),
        (["--roll_back", "previous", "--why", "x"], "invalid choice"),
        (["--verdict", "{verdict}", "--why", "x"], "--why goes with --roll_back"),
        (["--verdict", "{verdict}", "--roll_back", "challenger"], "not allowed with"),
    ],
)
def test_bad_roll_back_arguments_exit_2(root, capsys, extra, message):
    push(root, "100")
    path = verdict(root, "m")
    argv = ["--serving_dir", root / "serving", *(a.format(verdict=path) for a in extra)]
    assert promote.main(argv) == 2
    assert message in capsys.readouterr().err
