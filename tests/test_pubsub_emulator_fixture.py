"""The emulator fixture itself: without the emulator, tests that need it fail, saying how to
install it (CI must not pass without them)."""

from __future__ import annotations

import pytest

from tests import pubsub_emulator


def test_missing_emulator_fails_with_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(pubsub_emulator, "EMULATOR", tmp_path / "no-such-emulator")
    monkeypatch.setattr(pubsub_emulator.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception) as failure:
        pubsub_emulator.start_emulator(tmp_path / "emulator.log")
    assert "gcloud components install pubsub-emulator" in str(failure.value)
    assert "apt-get install google-cloud-cli-pubsub-emulator" in str(failure.value)


def test_emulator_answers_and_clients_reach_it(pubsub_emulator):
    from google.cloud import pubsub_v1

    topic, subscription = pubsub_emulator.topic_and_subscription("probe")
    publisher = pubsub_v1.PublisherClient()
    publisher.publish(topic, b"hello", event_time="2026-11-01T12:00:00Z").result(timeout=30)
    subscriber = pubsub_v1.SubscriberClient()
    response = subscriber.pull(subscription=subscription, max_messages=1, timeout=30)
    (received,) = response.received_messages
    assert (received.message.data, dict(received.message.attributes)) == (
        b"hello",
        {"event_time": "2026-11-01T12:00:00Z"},
    )
