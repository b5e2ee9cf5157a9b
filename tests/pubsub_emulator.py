"""The Google Cloud SDK's Pub/Sub emulator as a pytest fixture (a real Pub/Sub, on loopback).

``pubsub_emulator`` (session scope) starts
``cloud-pubsub-emulator --host=127.0.0.1 --port=N`` on a free port, waits until it answers,
points ``PUBSUB_EMULATOR_HOST`` at it (for the test process and every subprocess it starts)
and stops it after the session. Without the emulator the tests that use it fail, with the
sentence saying how to install it: they are part of CI, not optional.

    def test_something(pubsub_emulator):
        topic, subscription = pubsub_emulator.topic_and_subscription("decisions")
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PROJECT = "loopline-test"
INSTALL_HINT = (
    "the Pub/Sub emulator is not installed: install the Google Cloud SDK's pubsub-emulator "
    "component (`apt-get install google-cloud-cli-pubsub-emulator`, or "
    "`gcloud components install pubsub-emulator`; it needs Java 11+)"
)
START_TIMEOUT_S = 90


def emulator_binary() -> Path | None:
    """The emulator's launcher: the SDK's usual place, else ``cloud-pubsub-emulator`` on PATH."""
    if EMULATOR.exists():
        return EMULATOR
    found = shutil.which("cloud-pubsub-emulator")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PubSubEmulator:
    """A running emulator: its ``host`` (``127.0.0.1:N``) and helpers for topics."""

    def __init__(self, host: str, project: str = PROJECT):
        self.host = host
        self.project = project

    def topic_and_subscription(
        self, name: str, retain_acked_messages: bool = False
    ) -> tuple[str, str]:
        """A new topic and a subscription to it (names unique per call, at least 3 chars).

        ``retain_acked_messages`` lets a ``seek`` replay acked messages (a redelivery)."""
        from google.cloud import pubsub_v1

        suffix = uuid.uuid4().hex[:8]
        topic = f"projects/{self.project}/topics/{name}-{suffix}"
        subscription = f"projects/{self.project}/subscriptions/{name}-{suffix}"
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        try:
            publisher.create_topic(name=topic)
            subscriber.create_subscription(
                request={
                    "name": subscription,
                    "topic": topic,
                    "ack_deadline_seconds": 60,
                    "retain_acked_messages": retain_acked_messages,
                }
            )
        finally:
            subscriber.close()
            publisher.stop()
        return topic, subscription


def start_emulator(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Starts the emulator on a free port; returns (process, host) once it answers."""
    binary = emulator_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    port = free_port()
    host = f"127.0.0.1:{port}"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [str(binary), "--host=127.0.0.1", f"--port={port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its java child goes with it on stop
    )
    process.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.close()
            pytest.fail(
                f"the Pub/Sub emulator exited with status {process.returncode}; its log: "
                f"{log_path.read_text(errors='replace')[-2000:]}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(f"http://{host}/", timeout=2) as response:
                if response.status == 200:
                    return process, host
        except OSError:
            time.sleep(0.5)
    stop_emulator(process)
    pytest.fail(
        f"the Pub/Sub emulator did not answer on {host} in {START_TIMEOUT_S} s", pytrace=False
    )


def stop_emulator(process: subprocess.Popen) -> None:
    """Stops the emulator and its java process (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=20)
    process.log.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    """A running Pub/Sub emulator; ``PUBSUB_EMULATOR_HOST`` points at it during the session."""
    log_path = tmp_path_factory.mktemp("pubsub-emulator") / "emulator.log"
    process, host = start_emulator(log_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", host)
        mp.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
        try:
            yield PubSubEmulator(host)
        finally:
            stop_emulator(process)
