"""Stands in for APIToolkit's `/api/client_metadata`: accepts one API key and names the Pub/Sub
topic to publish to. The end-to-end tests run it in a thread; `cargo xtask bench` runs it as a
script for the apitoolkit-flask SDK (`metadata_stub.py PORT TOPIC [SERVICE_ACCOUNT_JSON]`)."""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "test-api-key"
PROJECT_ID = "6a1c2f8e-8d6f-4c1f-9a57-0b1b7b2a9c11"
PUBSUB_PROJECT = "apitoolkit-test"


class MetadataStub:
    API_KEY = API_KEY

    def __init__(self, topic: str, port: int = 0, service_account=None):
        body = json.dumps({
            "project_id": PROJECT_ID, "topic_id": topic, "pubsub_project_id": PUBSUB_PROJECT,
            "pubsub_push_service_account": service_account or {},
        }).encode()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                stub.requests.append((self.path, self.headers.get("Authorization")))
                ok = self.path == "/api/client_metadata" and self.headers.get("Authorization") == f"Bearer {API_KEY}"
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if ok else 0))
                self.end_headers()
                if ok:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


if __name__ == "__main__":
    account = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    MetadataStub(sys.argv[2], port=int(sys.argv[1]), service_account=account)
    threading.Event().wait()
