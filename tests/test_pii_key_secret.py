"""--pii_key_secret: the pseudonymisation key read from Secret Manager by the launcher.

Secret Manager is a cloud service, so it is faked at the client boundary: ``FakeSecretManager``
stands in for ``google.cloud.secretmanager.SecretManagerServiceClient`` (patched on the module,
where ``loopline.examples.pii_key`` constructs it) and answers ``access_secret_version(name=)``
with a payload, or raises the google.api_core error the real client raises. Everything else is
real: the join runs on the DirectRunner and its TFRecords are read back with TensorFlow.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import tensorflow as tf
from google.api_core.exceptions import NotFound, PermissionDenied
from google.cloud import secretmanager

from loopline.blueprint import load_blueprint
from loopline.events import parse_decision_json
from loopline.examples import PiiKeyMissing, PiiKeySecretError, pii_key, pseudonymise
from loopline.simulate import Simulator
from pipelines import bulk_score, join_decisions, monitor
from tests.join_fixtures import join_args
from tests.scoring_fixtures import export_scoring_model

REPO = Path(__file__).resolve().parent.parent
BLUEPRINT = REPO / "examples" / "notify.yaml"
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
SECRET = "projects/acme-ml/secrets/loopline-pii-key/versions/3"
SECRET_KEY = b"secret-manager-key-\x00\xff"  # payloads are bytes; any bytes are a key
ENV_KEY = "environment-key"


class FakeSecretManager:
    """SecretManagerServiceClient's ``access_secret_version`` over a dict of secret versions."""

    calls: list[str] = []

    def __init__(self, secrets: dict[str, bytes] | None = None, error: Exception | None = None):
        self.secrets = {SECRET: SECRET_KEY} if secrets is None else secrets
        self.error = error

    def access_secret_version(self, *, name: str):
        FakeSecretManager.calls.append(name)
        if self.error is not None:
            raise self.error
        if name not in self.secrets:
            raise NotFound(f"Secret Version [{name}] not found.")
        return SimpleNamespace(payload=SimpleNamespace(data=self.secrets[name]))


@pytest.fixture
def secret_manager(monkeypatch):
    """Every client the pipelines construct is a FakeSecretManager; the env key is unset."""
    FakeSecretManager.calls = []
    monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", FakeSecretManager)
    monkeypatch.delenv("LOOPLINE_PII_KEY", raising=False)
    return FakeSecretManager


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    Simulator(load_blueprint(BLUEPRINT), seed=5).run(out, decisions=60, days=1, start_ms=START_MS)
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_key_is_the_secret_payload_fetched_once(blueprint, secret_manager):
    assert pii_key(blueprint, SECRET) == SECRET_KEY
    assert secret_manager.calls == [SECRET]


def test_given_client_is_used(blueprint):
    client = FakeSecretManager({SECRET: b"k2"})
    assert pii_key(blueprint, SECRET, client=client) == b"k2"


def test_env_var_still_gives_the_key_without_a_secret(blueprint, secret_manager, monkeypatch):
    monkeypatch.setenv("LOOPLINE_PII_KEY", ENV_KEY)
    assert pii_key(blueprint) == ENV_KEY.encode()
    assert secret_manager.calls == []


@pytest.mark.parametrize(
    "name",
    [
        "projects/acme-ml/secrets/loopline-pii-key",
        "loopline-pii-key",
        "projects/acme-ml/secrets/a/b/versions/1",
        "projects/acme-ml/secrets/s/versions/1\n",
    ],
)
def test_malformed_secret_name_is_refused_without_calling_secret_manager(
    blueprint, secret_manager, name
):
    with pytest.raises(PiiKeySecretError, match="--pii_key_secret must name a secret version"):
        pii_key(blueprint, name)
    assert secret_manager.calls == []


@pytest.mark.parametrize(
    "client, reason",
    [
        (FakeSecretManager(error=PermissionDenied("Permission denied on secret")), "denied"),
        (FakeSecretManager(secrets={}), "not found"),
        (FakeSecretManager(secrets={SECRET: b""}), "empty"),
    ],
)
def test_unreadable_secret_is_a_pii_key_error_naming_it(blueprint, client, reason):
    with pytest.raises(PiiKeyMissing) as info:
        pii_key(blueprint, SECRET, client=client)
    message = str(info.value)
    assert isinstance(info.value, PiiKeySecretError)
    assert SECRET in message and reason in message.lower() and "\n" not in message


@pytest.mark.slow
def test_join_pseudonymises_with_the_secret_key_and_never_writes_it(
    logs, tmp_path, secret_manager, capsys
):
    output = tmp_path / "span"
    join_decisions.run(join_args(logs, output, "--pii_key_secret", SECRET))
    assert secret_manager.calls == [SECRET]

    raw_user = {}
    for path in glob.glob(str(logs / "decisions-*.jsonl")):
        for line in Path(path).read_text().splitlines():
            decision = parse_decision_json(line)
            if hasattr(decision, "decision_id"):
                raw_user[decision.decision_id] = decision.features["user_id"]
    files = sorted(glob.glob(str(output / "examples" / "*" / "*.tfrecord.gz")))
    examples = [
        tf.train.Example.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(files, compression_type="GZIP")
    ]
    assert examples
    for example in examples:
        feature = example.features.feature
        decision_id = feature["decision_id"].bytes_list.value[0].decode()
        hashed = feature["user_id"].bytes_list.value[0].decode()
        assert hashed == pseudonymise(raw_user[decision_id], SECRET_KEY)
        assert hashed != pseudonymise(raw_user[decision_id], ENV_KEY.encode())

    secret_text = SECRET_KEY.decode("latin-1")
    for path in output.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            assert secret_text not in path.read_text("latin-1"), path
    captured = capsys.readouterr()
    assert secret_text not in captured.out + captured.err


@pytest.mark.parametrize(
    "secret, client, message",
    [
        ("projects/acme-ml/secrets/loopline-pii-key", None, "must name a secret version"),
        (SECRET, FakeSecretManager(error=PermissionDenied("Permission denied")), "secretAccessor"),
    ],
)
def test_join_with_a_bad_secret_fails_at_start_with_one_line(
    secret, client, message, logs, tmp_path, secret_manager, monkeypatch, capsys
):
    if client is not None:
        monkeypatch.setattr(secretmanager, "SecretManagerServiceClient", lambda: client)
    with pytest.raises(SystemExit) as info:
        join_decisions.run(join_args(logs, tmp_path / "out", "--pii_key_secret", secret))
    assert info.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("join_decisions: error:") and message in line
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def serving_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    export_scoring_model(load_blueprint(BLUEPRINT), root / "1793534400", seed=1)
    return root


def _score_args(serving_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "candidates-0.jsonl").touch()  # an input must match when the job is resolved
    return [
        "--input", str(tmp_path / "candidates-*.jsonl"),
        "--model_dir", str(serving_dir),
        "--blueprint", str(BLUEPRINT),
        "--output", str(tmp_path / "scores"),
        *extra,
    ]  # fmt: skip


def test_bulk_scoring_job_carries_the_secret_key(serving_dir, tmp_path, secret_manager):
    options = bulk_score.PipelineOptions(
        _score_args(serving_dir, tmp_path, "--pii_key_secret", SECRET)
    )
    job, _ = bulk_score.resolve_job(options.view_as(bulk_score.BulkScoreOptions))
    assert job.key == SECRET_KEY and secret_manager.calls == [SECRET]


def test_bulk_scoring_with_a_malformed_secret_fails_with_one_line(
    serving_dir, tmp_path, secret_manager, capsys
):
    assert (
        bulk_score.main(_score_args(serving_dir, tmp_path, "--pii_key_secret", "projects/p")) == 2
    )
    line = _one_error_line(capsys)
    assert line.startswith("bulk_score: error:") and "--pii_key_secret" in line
    assert secret_manager.calls == []


def test_monitor_with_a_malformed_secret_fails_with_one_line(tmp_path, secret_manager, capsys):
    (tmp_path / "scores.jsonl").write_text("")
    (tmp_path / "observations.jsonl").write_text("")
    code = monitor.main([
        "--scores", str(tmp_path / "scores.jsonl"),
        "--observations", str(tmp_path / "observations.jsonl"),
        "--blueprint", str(BLUEPRINT),
        "--output", str(tmp_path / "monitor"),
        "--pii_key_secret", "projects/p/secrets/s",
    ])  # fmt: skip
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("monitor: error: --pii_key_secret must name a secret version")


def test_every_pipeline_declares_the_flag_once_in_beams_combined_parser():
    """Beam parses all loaded options classes together: a shared flag must not clash."""
    options = bulk_score.PipelineOptions(["--pii_key_secret", SECRET])
    for cls in (
        join_decisions.JoinDecisionsOptions,
        bulk_score.BulkScoreOptions,
        monitor.MonitorOptions,
    ):
        assert options.view_as(cls).pii_key_secret == SECRET
    assert json.dumps(options.get_all_options()["pii_key_secret"]) == json.dumps(SECRET)
