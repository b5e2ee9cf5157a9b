"""Fixtures shared by the suites: the example blueprint and a PII key for it."""

import os
from pathlib import Path

import pytest

from loopline.blueprint import load_blueprint

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_BLUEPRINT = REPO / "examples" / "notify.yaml"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


@pytest.fixture(scope="session")
def blueprint_path() -> Path:
    return EXAMPLE_BLUEPRINT


@pytest.fixture(scope="session")
def blueprint():
    return load_blueprint(EXAMPLE_BLUEPRINT)


@pytest.fixture
def pii_key(monkeypatch):
    """The example blueprint pseudonymises user_id; its key comes from the environment."""
    monkeypatch.setenv("LOOPLINE_PII_KEY", "test-key-not-a-secret")
    return "test-key-not-a-secret"


# The emulators, each started once per session by the first test that asks for it.
from tests.gcs_emulator import gcs_emulator, gcs_path, gcs_server  # noqa: E402, F401
from tests.pubsub_emulator import pubsub_emulator  # noqa: E402, F401
