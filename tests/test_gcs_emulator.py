"""The GCS emulator fixture itself: a real storage API, reachable from this process and others."""

import socket
import subprocess
import sys

from google.cloud import storage


def test_storage_client_round_trips_an_object(gcs_emulator):
    client = storage.Client()
    blob = client.bucket(gcs_emulator.bucket).blob("round-trip/hello.txt")
    blob.upload_from_string(b"hello, emulator")
    assert client.bucket(gcs_emulator.bucket).blob("round-trip/hello.txt").download_as_bytes() == (
        b"hello, emulator"
    )
    assert "round-trip/hello.txt" in [b.name for b in client.list_blobs(gcs_emulator.bucket)]


def test_wipe_empties_the_bucket_and_keeps_it(gcs_emulator):
    client = storage.Client()
    client.bucket(gcs_emulator.bucket).blob("wiped/a.txt").upload_from_string(b"a")
    gcs_emulator.wipe()
    assert list(client.list_blobs(gcs_emulator.bucket)) == []
    assert client.get_bucket(gcs_emulator.bucket).name == gcs_emulator.bucket


def test_a_subprocess_gets_anonymous_credentials_from_the_site_customization(gcs_emulator):
    """What keeps Beam from retrying the metadata server in every worker process."""
    probe = "import google.auth; c, p = google.auth.default(); print(type(c).__name__, p)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=gcs_emulator.subprocess_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AnonymousCredentials", "loopline-test"]


def test_the_proxy_refuses_hosts_other_than_google_storage(gcs_emulator):
    host, port = gcs_emulator.env["HTTPS_PROXY"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert connection.recv(64).startswith(b"HTTP/1.1 403")
