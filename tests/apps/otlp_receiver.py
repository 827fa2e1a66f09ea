"""An OTLP trace receiver for the tests: OTLP/gRPC (grpcio) or OTLP/HTTP protobuf (POST
/v1/traces), decoding with the official OpenTelemetry protobuf definitions (PyPI
`opentelemetry-proto`). It keeps every span it receives as a plain dict, records the request
headers, can insist on an API key (UNAUTHENTICATED / 401 otherwise), and can be stopped and
started again on the same port to play an outage. With a certificate it serves TLS (https)."""
import socket
import ssl
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: any_value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def attributes(key_values):
    return {item.key: any_value(item.value) for item in key_values}


def spans_of(request):
    """The spans of an ExportTraceServiceRequest, each with its resource's attributes."""
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": span.kind,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "status": span.status.code,
                    "attributes": attributes(span.attributes),
                    "resource": resource,
                }


SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3


class OtlpReceiver:
    def __init__(self, protocol: str, port: int, api_key=None, keep_spans=True, certificate=None):
        """`certificate`: (cert.pem, key.pem) paths to serve TLS with."""
        self.protocol = protocol
        self.keep_spans = keep_spans
        self.certificate = certificate
        self.span_count = 0
        self.port = port
        self.endpoint = f"{'https' if certificate else 'http'}://127.0.0.1:{port}"
        self.api_key = api_key
        self.spans = []
        self.headers = []
        self.rejected = 0
        self.lock = threading.Lock()
        self._server = None
        # Open HTTP connections: stopping closes them too, as a dead receiver's would be.
        self._connections = set()
        self.start()

    def _receive(self, headers, request) -> bool:
        """Keeps the spans of an accepted request; False when the API key is wrong."""
        with self.lock:
            if self.keep_spans:
                self.headers.append(headers)
            if self.api_key is not None and headers.get("x-api-key") != self.api_key:
                self.rejected += 1
                return False
            if self.keep_spans:
                self.spans.extend(spans_of(request))
            self.span_count += sum(len(scope_spans.spans) for resource_spans in request.resource_spans
                                   for scope_spans in resource_spans.scope_spans)
            return True

    def start(self):
        if self.protocol == "grpc":
            self._server = self._grpc_server()
        else:
            self._server = self._http_server()

    def _grpc_server(self):
        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                headers = {key: value for key, value in context.invocation_metadata()}
                if not receiver._receive(headers, request):
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                             options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
        address = f"127.0.0.1:{self.port}"
        if self.certificate:
            cert, key = (open(path, "rb").read() for path in self.certificate)
            server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            server.add_insecure_port(address)
        server.start()
        return server

    def _http_server(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as collectors do.
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with receiver.lock:
                    receiver._connections.add(self.connection)

            def finish(self):
                super().finish()
                with receiver.lock:
                    receiver._connections.discard(self.connection)

            def refuse(self, status):
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    return self.refuse(404)
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    return self.refuse(415)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                headers = {key.lower(): value for key, value in self.headers.items()}
                if not receiver._receive(headers, request):
                    return self.refuse(401)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.certificate)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def stop(self):
        """Closes the port: connections are refused, as a dead receiver's would be."""
        if self._server is None:
            return
        if self.protocol == "grpc":
            self._server.stop(grace=None).wait()
        else:
            self._server.shutdown()
            self._server.server_close()
            with self.lock:
                for connection in self._connections:
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        self._server = None

    def wait_until_quiet(self, quiet: float = 3.0, timeout: float = 30.0):
        """Waits until no span arrived for `quiet` seconds; returns them all."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                count = len(self.spans)
            if count != seen:
                seen, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.1)
        with self.lock:
            return list(self.spans)


def main():
    """A standalone receiver that only counts spans (the benchmark's OTLP destination)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    OtlpReceiver(args.protocol, args.port, keep_spans=False)
    threading.Event().wait()


if __name__ == "__main__":
    main()
