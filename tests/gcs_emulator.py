"""A real GCS emulator under the tests: `gcp-storage-emulator` from PyPI, started per session.

    def test_something(gcs_path):            # a fresh gs://loopline-test/<test>-<id> prefix
        FileSystems.create(f"{gcs_path}/a.txt")

    def test_a_job(gcs_emulator):
        subprocess.run([...], env=gcs_emulator.subprocess_env(), check=True)

How each client reaches it (measured on Beam 2.61, TensorFlow 2.16):
- Beam's GCSFileSystem and google-cloud-storage: `STORAGE_EMULATOR_HOST`. Beam has no endpoint
  option; without credentials it retries `google.auth.default` for 20-26 s, so every process
  started with `subprocess_env()` loads tests/gcs_site/sitecustomize.py, which returns anonymous
  credentials (the DirectRunner's worker processes inherit it); the pytest process gets the
  same patch, and the variables below, for the test module that uses the fixture.
- TensorFlow's built-in GCS filesystem ignores `STORAGE_EMULATOR_HOST` (its endpoints are
  hard-coded), so it goes through tests/gcs_server.py's TLS-terminating proxy: `HTTPS_PROXY`,
  a CA made here with openssl (`CURL_CA_BUNDLE`), a fixed token
  (`GOOGLE_AUTH_TOKEN_FOR_TESTING`) and no metadata-server probe (`NO_GCE_CHECK`), read on
  every request. `GCS_STAT_CACHE_MAX_AGE=0`, else `exists()` sees a deleted file for 5 s, and
  `GCS_READ_CACHE_BLOCK_SIZE_MB=1`, which makes small reads 20 times faster, are read once per
  process, when TensorFlow first touches gs://: a process must not touch gs:// before then.
These variables exist only in the tests' environment: nothing in loopline/ reads them.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SITE = TESTS / "gcs_site"
SERVER = TESTS / "gcs_server.py"
BUCKET = "loopline-test"
STORAGE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
START_TIMEOUT_S = 30


@dataclass
class GcsEmulator:
    """A running emulator: its bucket, endpoint and the environment that points clients at it."""

    bucket: str
    endpoint: str
    env: dict[str, str]
    process: subprocess.Popen = field(repr=False)

    def url(self, *parts: str) -> str:
        """`gs://<bucket>/<parts joined by />`."""
        return "/".join([f"gs://{self.bucket}", *parts])

    def wipe(self) -> None:
        """Deletes every object; the bucket stays."""
        with urllib.request.urlopen(f"{self.endpoint}/wipe?keep-buckets=true", timeout=10):
            pass

    def subprocess_env(self) -> dict[str, str]:
        """os.environ plus `env`: for a pipeline (and its workers) run as a subprocess."""
        return {**os.environ, **self.env}


def make_test_ca(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate it signs for the Google storage hosts (openssl)."""
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, pem = directory / "leaf.key", directory / "leaf.csr", directory / "leaf.pem"
    extensions = directory / "leaf.ext"
    extensions.write_text(
        "subjectAltName=" + ",".join(f"DNS:{host}" for host in STORAGE_HOSTS) + "\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca_pem, "-days", "2",
         "-subj", "/CN=Loopline test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={STORAGE_HOSTS[0]}"],
        ["x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial",
         "-out", pem, "-days", "2", "-extfile", extensions],
    ]  # fmt: skip
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return {"ca": ca_pem, "cert": pem, "key": key}


def start_emulator(directory: Path, bucket: str = BUCKET) -> GcsEmulator:
    """Starts tests/gcs_server.py (emulator + proxy) and waits until both listen."""
    tls = make_test_ca(directory)
    with open(directory / "gcs_server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(SERVER), "--bucket", bucket,
             "--cert", str(tls["cert"]), "--key", str(tls["key"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
    started, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
    ready = process.stdout.readline().decode().split() if started else []
    if len(ready) != 3 or ready[0] != "ready":
        process.kill()
        raise RuntimeError(f"the GCS emulator did not start; see {directory / 'gcs_server.log'}")
    emulator_port, proxy_port = ready[1:]
    endpoint = f"http://127.0.0.1:{emulator_port}"
    pythonpath = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "PYTHONPATH": pythonpath,
        "GOOGLE_CLOUD_PROJECT": "loopline-test",
        "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
        "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": str(tls["ca"]),
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "loopline-test-token",
        "NO_GCE_CHECK": "true",
        "GCS_STAT_CACHE_MAX_AGE": "0",
        "GCS_READ_CACHE_BLOCK_SIZE_MB": "1",
    }
    return GcsEmulator(bucket=bucket, endpoint=endpoint, env=env, process=process)


def stop_emulator(emulator: GcsEmulator) -> None:
    emulator.process.stdin.close()  # the server runs until its stdin closes
    try:
        emulator.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        emulator.process.kill()
        emulator.process.wait()


def _site_customization():
    spec = spec_from_file_location("loopline_tests_gcs_site", SITE / "sitecustomize.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The session's emulator and proxy processes; nothing in this process is changed."""
    emulator = start_emulator(tmp_path_factory.mktemp("gcs"))
    yield emulator
    stop_emulator(emulator)


@pytest.fixture(scope="module")
def gcs_emulator(gcs_server):
    """The emulator, with this process pointed at it for one test module.

    Module scope, so a module's expensive pipeline fixture can use it, and the variables (among
    them HTTPS_PROXY) leave this process again before other suites run.
    """
    site = _site_customization()
    replaced = site.use_anonymous_credentials()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in gcs_server.env.items():
                env.setenv(name, value)
            yield gcs_server
    finally:
        site.restore_credentials(replaced)


@pytest.fixture
def gcs_path(gcs_emulator, request):
    """A fresh gs:// prefix for one test (no trailing slash)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
    return gcs_emulator.url(f"{name}-{uuid.uuid4().hex[:8]}")
