"""An HTTP server whose GET /stream?mib=N moves N MiB of non-HTTP bytes over a fresh loopback
TCP connection inside this process (a database or cache client would), then answers with the
count. The agent must give such connections up in the kernel, not copy every byte."""

import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CHUNK = bytes(range(256)) * 256  # 64 KiB that starts with no HTTP method


def stream(mib: int) -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = 0

    def receive():
        nonlocal received
        connection, _ = listener.accept()
        with connection:
            while chunk := connection.recv(1 << 16):
                received += len(chunk)

    receiver = threading.Thread(target=receive)
    receiver.start()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        for _ in range(mib * 16):
            sender.sendall(CHUNK)
    receiver.join()
    listener.close()
    return received


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/stream":
            text = str(stream(int(parse_qs(url.query)["mib"][0]))).encode()
        else:
            text = b"ok"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
