"""loopline.registry: aliases, moves and resolution, on a local serving dir and on gs://.

The SavedModels here are placeholder ``saved_model.pb`` files: the registry only names and
finds models (loading one is tests/test_inference.py's business).
"""

import json
import uuid

import pytest

from loopline import registry, storage
from tests.fake_gcs import root_for


@pytest.fixture(params=["local", "gs"])
def serving(request, tmp_path, monkeypatch):
    """An empty serving dir, ``SERVING``, locally and on the fake GCS."""
    return root_for(request.param, tmp_path, monkeypatch)


def push(serving, version: str, blessed=True, blueprint="notify", model_id=None) -> dict:
    """What the Pusher and pipelines.model_record leave behind for one pushed version."""
    (serving.local / version).mkdir(parents=True)
    (serving.local / version / "saved_model.pb").write_bytes(b"placeholder")
    record = {
        "model_id": model_id or str(uuid.uuid4()),
        "name": f"{blueprint}-{version}",
        "version": version,
        "blessed": blessed,
        "pushed": blessed,
        "blueprint": {"name": blueprint},
    }
    (serving.local / f"{version}.record.json").write_text(json.dumps(record))
    return record


def registered(serving, version: str, **kwargs) -> dict:
    record = push(serving, version, **kwargs)
    registry.register(serving.uri, record)
    return record


# --------------------------------------------------------------------------- moves


def test_a_serving_dir_without_aliases_has_every_alias_null(serving):
    assert registry.read_aliases(serving.uri) == registry.Aliases()


def test_the_first_blessed_push_becomes_challenger_not_production(serving):
    record = registered(serving, "100")
    aliases = registry.read_aliases(serving.uri)
    assert (aliases.production, aliases.challenger, aliases.previous) == (
        None,
        record["model_id"],
        None,
    )


def test_registration_is_written_to_aliases_json_in_the_serving_dir(serving):
    record = registered(serving, "100")
    written = json.loads((serving.local / "aliases.json").read_text())
    assert written["challenger"] == record["model_id"] and written["production"] is None
    assert [m["alias"] for m in written["history"]] == ["challenger"]


def test_a_newer_push_does_not_replace_a_challenger_under_test(serving):
    first = registered(serving, "100")
    second = push(serving, "200")
    with pytest.raises(registry.ChallengerInTraffic, match="is still under test"):
        registry.register(serving.uri, second)
    assert registry.read_aliases(serving.uri).challenger == first["model_id"]


def test_a_challenger_is_replaced_only_when_asked_and_the_move_says_so(serving):
    first = registered(serving, "100")
    second = push(serving, "200")
    aliases = registry.register(serving.uri, second, replace_challenger=True)
    assert aliases.challenger == second["model_id"]
    last = aliases.history[-1]
    assert (last["from"], last["to"]) == (first["model_id"], second["model_id"])
    assert "replaces challenger" in last["why"]


def test_registering_the_same_model_twice_changes_nothing(serving):
    record = registered(serving, "100")
    before = (serving.local / "aliases.json").read_bytes()
    registry.register(serving.uri, record)
    assert (serving.local / "aliases.json").read_bytes() == before


def test_a_model_that_was_not_blessed_is_not_registered(serving):
    record = push(serving, "100", blessed=False)
    with pytest.raises(registry.RegistryError, match="only a blessed, pushed model"):
        registry.register(serving.uri, record)
    assert not (serving.local / "aliases.json").exists()


def test_promote_moves_challenger_to_production_and_production_to_previous(serving):
    old = registered(serving, "100")
    registry.promote(serving.uri, "first model beat the fallback")
    new = registered(serving, "200")
    aliases = registry.promote(serving.uri, "challenger_better")
    assert (aliases.production, aliases.challenger, aliases.previous) == (
        new["model_id"],
        None,
        old["model_id"],
    )
    assert registry.read_aliases(serving.uri) == aliases


def test_promote_without_a_challenger_is_an_error(serving):
    with pytest.raises(registry.RegistryError, match="no challenger to promote"):
        registry.promote(serving.uri, "why")


def test_rolling_back_the_challenger_leaves_production_serving(serving):
    production = registered(serving, "100")
    registry.promote(serving.uri, "better")
    registered(serving, "200")
    aliases = registry.roll_back(serving.uri, "challenger_worse")
    assert (aliases.production, aliases.challenger) == (production["model_id"], None)


def test_rolling_back_production_restores_the_previous_model(serving):
    old = registered(serving, "100")
    registry.promote(serving.uri, "better")
    registered(serving, "200")
    registry.promote(serving.uri, "better")
    aliases = registry.roll_back(serving.uri, "guardrail fired", alias="production")
    assert (aliases.production, aliases.previous) == (old["model_id"], None)


def test_rolling_back_production_without_a_previous_model_is_an_error(serving):
    registered(serving, "100")
    registry.promote(serving.uri, "better")
    with pytest.raises(registry.RegistryError, match="no previous model"):
        registry.roll_back(serving.uri, "why", alias="production")


def test_history_records_every_move_with_when_from_to_and_why(serving):
    a = registered(serving, "100")
    registry.promote(serving.uri, "beat the fallback", at="2026-11-05T06:00:00+00:00")
    history = registry.read_aliases(serving.uri).history
    assert [(m["alias"], m["from"], m["to"]) for m in history] == [
        ("challenger", None, a["model_id"]),
        ("production", None, a["model_id"]),
        ("challenger", a["model_id"], None),
    ]
    assert history[1]["at"] == "2026-11-05T06:00:00+00:00"
    assert history[1]["why"] == "promoted: beat the fallback"


def test_history_is_only_appended_to(serving):
    registered(serving, "100")
    before = registry.read_aliases(serving.uri).history
    registry.promote(serving.uri, "better")
    assert registry.read_aliases(serving.uri).history[: len(before)] == before


def test_a_move_racing_another_writer_fails_and_loses_nothing(serving, monkeypatch):
    registered(serving, "100")
    read = storage.read_if_exists
    raced = []

    def read_while_someone_rolls_back_by_hand(path):
        data = read(path)
        if not raced:  # between our read and our write, another writer finishes a move
            raced.append(path)
            registry.roll_back(serving.uri, "rolled back by hand")
        return data

    monkeypatch.setattr(storage, "read_if_exists", read_while_someone_rolls_back_by_hand)
    with pytest.raises(storage.ConcurrentUpdate, match="changed by another writer"):
        registry.promote(serving.uri, "challenger_better")
    aliases = registry.read_aliases(serving.uri)
    assert (aliases.production, aliases.challenger) == (None, None)  # the manual move stands
    assert aliases.history[-1]["why"] == "rolled back: rolled back by hand"


def test_an_aliases_file_that_is_not_one_is_an_error_naming_it(serving):
    (serving.local / "aliases.json").write_text('{"production": 3}')
    with pytest.raises(registry.RegistryError, match="aliases.json: production must be"):
        registry.read_aliases(serving.uri)


# --------------------------------------------------------------------------- resolving


def test_production_alias_resolves_to_the_promoted_model(serving):
    record = registered(serving, "100")
    registry.promote(serving.uri, "better")
    model = registry.resolve(serving.uri)  # production is the default
    assert (model.model_id, model.version, model.alias) == (record["model_id"], "100", "production")
    assert model.path == serving / "100" and model.name == "notify-100"
    assert model.record == record


def test_challenger_alias_resolves_to_the_challenger(serving):
    record = registered(serving, "100")
    assert registry.resolve(serving.uri, "challenger").model_id == record["model_id"]


def test_a_model_id_and_a_version_name_resolve_to_that_model(serving):
    first = registered(serving, "100")
    push(serving, "200")
    assert registry.resolve(serving.uri, first["model_id"]).version == "100"
    assert registry.resolve(serving.uri, "100").model_id == first["model_id"]


def test_the_newest_directory_is_never_chosen_without_an_alias(serving):
    registered(serving, "100")
    push(serving, "200")
    with pytest.raises(registry.ModelNotFound, match="has no production model"):
        registry.resolve(serving.uri)


def test_a_version_directory_itself_resolves_to_that_version(serving):
    record = registered(serving, "100")
    model = registry.resolve(serving / "100", None, "notify")
    assert (model.version, model.model_id) == ("100", record["model_id"])


def test_a_model_of_another_blueprint_is_refused(serving):
    registered(serving, "100", blueprint="ranking")
    with pytest.raises(registry.ModelNotFound, match="trained for blueprint 'ranking'"):
        registry.resolve(serving.uri, "challenger", blueprint_name="notify")


def test_an_unknown_reference_is_an_error_naming_it(serving):
    registered(serving, "100")
    with pytest.raises(registry.ModelNotFound, match="no model or version 300"):
        registry.resolve(serving.uri, "300")


def test_a_missing_serving_dir_is_an_error(serving):
    with pytest.raises(registry.ModelNotFound, match="does not exist"):
        registry.resolve(serving / "nowhere")


def test_a_version_without_a_record_keeps_the_name_version_id(serving):
    (serving.local / "100").mkdir()
    (serving.local / "100" / "saved_model.pb").write_bytes(b"placeholder")
    model = registry.resolve_serving_model(serving.uri, "notify", "100")
    assert (model.model_id, model.record) == ("notify-100", {})


def test_a_move_decided_about_one_challenger_does_not_land_on_its_replacement(serving):
    first = registered(serving, "100")
    second = push(serving, "200")
    registry.register(serving.uri, second, replace_challenger=True)
    with pytest.raises(storage.ConcurrentUpdate, match=f"challenger is now {second['model_id']}"):
        registry.promote(serving.uri, "better", challenger=first["model_id"])
    assert registry.read_aliases(serving.uri).challenger == second["model_id"]
