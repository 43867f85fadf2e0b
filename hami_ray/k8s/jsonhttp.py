"""What the bridge's HTTP(S) servers share (the extender, the webhook): JSON bodies with a size limit, the
TLS handshake in the request's own thread (a slow or broken client never holds up the others), quiet logs,
and answers that never wait on the network.

Each answer goes out in one write on a ``TCP_NODELAY`` socket, over HTTP/1.1 keep-alive (issue 16). The
standard library's handler writes the status line and headers in one ``send`` and the body in a second; with
Nagle's algorithm on (the default) the kernel holds the small second segment until the client acknowledges
the first, and the client (kube-scheduler, any Linux peer) delays that ACK by 40 ms waiting for a reply it
could piggyback on. Every extender verb cost 40-44 ms of wall time for under 1 ms of CPU (strace: the
client's ``recvfrom`` of the body blocks 42 ms after the server's ``sendto`` returned); buffered, one write,
0.3-0.5 ms. See docs/kubernetes.md ("The extender's HTTP server").
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20  # 1 MiB, as HAMi's routes
NO_BODY = object()  # read_json's answer when it has answered the request itself


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler that reads and writes JSON; ``error_key`` names the error field of its answers."""

    timeout = 60  # a client that stops talking frees its thread (an idle keep-alive connection too)
    error_key = "error"
    require_length = True  # False: a request without Content-Length has an empty body
    protocol_version = "HTTP/1.1"  # keep-alive: kube-scheduler and the API server keep their connections
    # a buffered wfile: status line, headers and body leave in one write when the handler flushes
    # (BaseHTTPRequestHandler.handle_one_request, finish()); unbuffered (0, the default), they are two
    wbufsize = 1 << 16

    def setup(self) -> None:
        # no Nagle: a body larger than the buffer still goes out in two writes, and must not wait for an ACK
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()  # here, in this request's thread, not in the accepting one
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s failed: %s", self.client_address, exc)
                self.tls_failed = True

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def read_json(self) -> Any:
        """The request's JSON body, or :data:`NO_BODY` once a 411, 413 or 400 has been answered."""
        try:
            length = int(self.headers.get("Content-Length") or ("" if self.require_length else "0"))
        except ValueError:
            self.close_connection = True
            self.send_json(411, {self.error_key: "a Content-Length is required"})
            return NO_BODY
        if length > MAX_BODY or length < 0:
            self.close_connection = True
            self.send_json(413, {self.error_key: f"body over {MAX_BODY} bytes"})
            return NO_BODY
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except ValueError as exc:
            self.send_json(400, {self.error_key: f"body is not JSON: {exc}"})
            return NO_BODY

    def send_json(self, status: int, body: Any) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json")

    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()  # into the buffered wfile: nothing is sent yet
        self.wfile.write(body)
        self.wfile.flush()  # one write of headers and body

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


def make_server(cls: type[ThreadingHTTPServer], bind: str, handler: type[JsonHandler], tls_cert: str | None,
                tls_key: str | None, **attrs: Any) -> Any:
    """A ``cls`` on ``bind`` (``host:port``; port 0: a free one) with ``attrs`` set, serving HTTPS when a
    certificate and key are given; not started.

    Raises:
        ValueError: only one of the certificate and the key.
        OSError: the address is taken; a certificate that does not load.
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    host, _, port = bind.rpartition(":")
    server = cls((host.strip("[]") or "0.0.0.0", int(port)), handler)
    server.daemon_threads = True
    for name, value in attrs.items():
        setattr(server, name, value)
    if tls_cert and tls_key:
        try:
            serve_tls(server, tls_cert, tls_key)
        except (OSError, ssl.SSLError):
            server.server_close()
            raise
    return server


def serve_tls(server: ThreadingHTTPServer, cert: str, key: str) -> None:
    """Make ``server`` speak HTTPS (TLS 1.2 or later) with the PEM ``cert`` and ``key``; the handshake is
    done by each request's :class:`JsonHandler`, in its own thread."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
