"""The tests' GCS endpoint: gcp-storage-emulator and a TLS-terminating proxy in one process.

Beam and google-cloud-storage reach the emulator directly through `STORAGE_EMULATOR_HOST`.
TensorFlow's built-in GCS filesystem has its endpoints hard-coded (https://www.googleapis.com,
https://storage.googleapis.com) and ignores that variable, but honours `HTTPS_PROXY` and
`CURL_CA_BUNDLE`: the proxy here accepts `CONNECT` for those hosts only, terminates TLS with a
certificate from the tests' own CA (made by tests/gcs_emulator.py) and forwards each request to
the emulator in plain HTTP. Both listen on 127.0.0.1 only.

Run by tests/gcs_emulator.py, never by hand:

    python tests/gcs_server.py --bucket B --cert leaf.pem --key leaf.key

prints `ready <emulator port> <proxy port>` once both listen, and runs until stdin closes
(so it cannot outlive the pytest process that started it).
"""

import argparse
import http.client
import socket
import socketserver
import ssl
import sys
import threading

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

STORAGE_HOSTS = frozenset({"www.googleapis.com", "storage.googleapis.com"})
MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 64 * 1024
SOCKET_TIMEOUT_S = 60
# Hop-by-hop headers are the proxy's own business, never forwarded.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te"}
)


def accept_empty_media_uploads() -> None:
    """TensorFlow makes a directory marker with an empty-bodied `uploadType=media` POST.

    gcp-storage-emulator reads an empty body as None and fails on `len(None)`; an empty body
    is an empty object.
    """
    media_upload = objects._media_upload

    def media_upload_of_empty_body(request, response, storage):
        if request.data is None:
            request._data = b""
        return media_upload(request, response, storage)

    objects._media_upload = media_upload_of_empty_body


class _Request:
    """One HTTP/1.1 request read off the client's side of the tunnel."""

    def __init__(self, method: str, target: str, headers: list, body: bytes):
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _read_request(stream) -> _Request | None:
    request_line = stream.readline(MAX_HEADER_BYTES)
    if not request_line.strip():
        return None
    method, target, _ = request_line.decode("latin-1").split(" ", 2)
    headers = []
    while True:
        line = stream.readline(MAX_HEADER_BYTES)
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers.append((key.strip(), value.strip()))
    request = _Request(method, target, headers, b"")
    if (request.header("expect") or "").lower() == "100-continue":
        stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        stream.flush()
    if (request.header("transfer-encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int(stream.readline(MAX_HEADER_BYTES).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                stream.readline(MAX_HEADER_BYTES)
                break
            chunks.append(stream.read(size))
            stream.readline(MAX_HEADER_BYTES)
        request.body = b"".join(chunks)
    else:
        request.body = stream.read(int(request.header("content-length") or 0))
    return request


class _TunnelHandler(socketserver.StreamRequestHandler):
    """Serves one `CONNECT host:443` tunnel: TLS in, plain HTTP to the emulator out."""

    rbufsize = 0  # read no further than the CONNECT request: the TLS handshake follows it

    def handle(self) -> None:
        self.request.settimeout(SOCKET_TIMEOUT_S)
        connect = _read_request(self.rfile)
        host = connect.target.rsplit(":", 1)[0] if connect else ""
        if connect is None or connect.method != "CONNECT" or host not in STORAGE_HOSTS:
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        with self.server.tls.wrap_socket(self.request, server_side=True) as tls:
            stream = tls.makefile("rwb")
            while (request := _read_request(stream)) is not None:
                stream.write(self._forward(host, request))
                stream.flush()
                if (request.header("connection") or "").lower() == "close":
                    break

    def _forward(self, host: str, request: _Request) -> bytes:
        emulator = http.client.HTTPConnection(
            "127.0.0.1", self.server.emulator_port, timeout=SOCKET_TIMEOUT_S
        )
        try:
            emulator.putrequest(request.method, request.target, skip_host=True)
            for key, value in request.headers:
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    emulator.putheader(key, value)
            emulator.putheader("Content-Length", str(len(request.body)))
            emulator.endheaders(request.body)
            response = emulator.getresponse()
            body = response.read()
            head = [f"HTTP/1.1 {response.status} {response.reason}"]
            for key, value in response.getheaders():
                if key.lower() in HOP_BY_HOP or key.lower() == "content-length":
                    continue
                if key.lower() == "location":
                    # The emulator builds URLs from the Host header, with http://.
                    value = value.replace(f"http://{host}", f"https://{host}", 1)
                head.append(f"{key}: {value}")
            head.append(f"Content-Length: {len(body)}")
            return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        finally:
            emulator.close()


class _TunnelServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, emulator_port: int, tls: ssl.SSLContext):
        super().__init__(("127.0.0.1", 0), _TunnelHandler)
        self.emulator_port = emulator_port
        self.tls = tls
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(timeout=SOCKET_TIMEOUT_S):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # A client that drops its tunnel is routine; tests see failures on their side.
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--cert", required=True, help="PEM certificate for the storage hosts")
    parser.add_argument("--key", required=True, help="its PEM private key")
    args = parser.parse_args()

    accept_empty_media_uploads()
    emulator = create_server("127.0.0.1", 0, in_memory=True, default_bucket=args.bucket)
    emulator.start()
    emulator_port = emulator._api._httpd.server_port

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    proxy = _TunnelServer(emulator_port, tls)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    print(f"ready {emulator_port} {proxy.server_address[1]}", flush=True)
    sys.stdin.read()
    proxy.shutdown()
    emulator.stop()


if __name__ == "__main__":
    main()
