"""loopline.privacy: the blueprint's privacy applied to features and to refused payloads."""

import hashlib
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline import examples
from loopline.privacy import (
    PayloadPrivacy,
    QuarantinedPayload,
    apply_privacy,
    digest,
    pseudonymise,
    redact_payload,
)

KEY = b"test-key-not-a-secret"
USER = "u0000042"
EMAIL = "user42@example.com"


def hashed(value):
    return pseudonymise(value, KEY)


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"])), st.binary(min_size=1))
def test_pseudonymise_is_the_digest_examples_are_written_with(value, key):
    assert pseudonymise(value, key) == examples.pseudonymise(value, key)


def test_apply_privacy_drops_and_hashes_at_any_depth(blueprint):
    features = {
        "user_id": USER,
        "email": EMAIL,
        "country": "KR",
        "profile": {"email": EMAIL, "contacts": [{"user_id": "u2"}], "user_id": ["u3", None]},
    }
    assert apply_privacy(features, blueprint, KEY) == {
        "user_id": hashed(USER),
        "country": "KR",
        "profile": {"contacts": [{"user_id": hashed("u2")}], "user_id": [hashed("u3"), None]},
    }
    assert features["email"] == EMAIL  # the input is left alone


def test_apply_privacy_hashes_a_non_string_value_as_its_json(blueprint):
    assert apply_privacy({"user_id": 42}, blueprint, KEY) == {"user_id": hashed("42")}
    assert apply_privacy({"user_id": {"a": 1}}, blueprint, KEY) == {"user_id": hashed('{"a":1}')}


def test_apply_privacy_without_a_key_refuses_to_hash(blueprint):
    with pytest.raises(ValueError, match="user_id"):
        apply_privacy({"user_id": USER}, blueprint, None)
    assert apply_privacy({"email": EMAIL, "country": "KR"}, blueprint, None) == {"country": "KR"}


def decision_payload(**features):
    return {
        "decision_id": "d-1",
        "decision_type": "notify",
        "event_time": "2026-11-01T12:00:00Z",
        "features": {"user_id": USER, "email": EMAIL, "tenure_days": "old", **features},
    }


def test_a_json_object_keeps_its_shape_with_privacy_applied(blueprint):
    payload = {**decision_payload(), "user_id": USER, "email": EMAIL}
    assert redact_payload(json.dumps(payload).encode(), blueprint, KEY) == {
        "decision_id": "d-1",
        "decision_type": "notify",
        "event_time": "2026-11-01T12:00:00Z",
        "features": {"user_id": hashed(USER), "tenure_days": "old"},
        "user_id": hashed(USER),
    }


def test_a_leading_byte_order_mark_does_not_stop_redaction(blueprint):
    raw = b"\xef\xbb\xbf" + json.dumps(decision_payload()).encode()
    assert redact_payload(raw, blueprint, KEY)["features"]["user_id"] == hashed(USER)


def test_features_that_are_not_an_object_become_a_digest(blueprint):
    payload = {**decision_payload(), "features": [USER, EMAIL]}
    redacted = redact_payload(json.dumps(payload), blueprint, KEY)
    assert redacted["features"] == digest(json.dumps([USER, EMAIL], separators=(",", ":")))
    assert redacted["decision_id"] == "d-1"


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(decision_payload())[:60].encode(),  # cut off: not JSON
        b'{"features": {"user_id": "' + USER.encode() + b'\xff"}}',  # not UTF-8
        json.dumps([decision_payload()]).encode(),  # JSON, but not an object
        json.dumps(EMAIL),
        "",
    ],
)
def test_a_payload_that_is_not_a_json_object_becomes_its_sha256_and_length(blueprint, raw):
    data = raw.encode() if isinstance(raw, str) else raw
    assert redact_payload(raw, blueprint, KEY) == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "length": len(data),
    }


def test_a_payload_too_deep_to_walk_becomes_a_digest(blueprint):
    raw = '{"features": ' + '{"a": ' * 3000 + "1" + "}" * 3001
    assert set(redact_payload(raw, blueprint, KEY)) == {"sha256", "length"}


secret_value = st.sampled_from([USER, EMAIL])
json_with_secrets = st.recursive(
    st.none() | st.integers() | st.text(max_size=6) | secret_value,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["user_id", "email", "features", "country", "x"]), children, max_size=4
        )
    ),
    max_leaves=12,
)


def private_values(value):
    """(name, value) for every value under a private name, at any depth."""
    if isinstance(value, dict):
        for name, v in value.items():
            if name in ("user_id", "email"):
                yield name, v
            yield from private_values(v)
    elif isinstance(value, list):
        for v in value:
            yield from private_values(v)


def is_hashed(value):
    if isinstance(value, list):
        return all(map(is_hashed, value))
    return value is None or (isinstance(value, str) and len(value) == 64)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["user_id", "email", "features", "x"]), json_with_secrets),
    st.integers(min_value=0, max_value=400),
)
def test_no_private_name_in_a_redacted_payload_holds_a_raw_value(blueprint, obj, cut):
    """However the values nest and wherever the line is cut off: no dropped name is left, and
    every pseudonymised name holds only digests."""
    text = json.dumps({**obj, "features": {"user_id": USER, "email": EMAIL, "nested": obj}})
    for raw in (text, text[:cut]):
        found = list(private_values(redact_payload(raw, blueprint, KEY)))
        assert all(name == "user_id" and is_hashed(value) for name, value in found), found


def test_payload_privacy_needs_a_key_to_pseudonymise_and_never_shows_it(blueprint):
    with pytest.raises(ValueError, match="user_id"):
        PayloadPrivacy.from_blueprint(blueprint, None)
    privacy = PayloadPrivacy.from_blueprint(blueprint, KEY, quarantine=True)
    assert privacy.pseudonymise == ("user_id",) and privacy.drop == ("email",)
    assert KEY.decode() not in repr(privacy)
    assert pickle.loads(pickle.dumps(privacy)) == privacy
    line = json.dumps(decision_payload())
    assert privacy.redact(line) == redact_payload(line, blueprint, KEY)


def test_a_quarantined_payload_is_written_as_text_or_base64():
    text = QuarantinedPayload("decision", "bad_json", b'{"user_id": "u1"')
    assert json.loads(text.to_json()) == {
        "source": "decision",
        "reason": "bad_json",
        "sha256": hashlib.sha256(b'{"user_id": "u1"').hexdigest(),
        "payload": '{"user_id": "u1"',
    }
    binary = json.loads(QuarantinedPayload("observation", "bad_json", b"\xff\x00").to_json())
    assert binary["payload_base64"] == "/wA=" and "payload" not in binary
