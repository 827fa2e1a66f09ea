"""Demo and test service: a plain Flask app, run by werkzeug or gunicorn, never instrumented."""
import os
import sys

import requests
from flask import Flask, Response, jsonify, request, send_file

app = Flask(__name__)

BIG_BODY_BYTES = 2 * 1024 * 1024


def big_body() -> bytes:
    pattern = bytes(range(256))
    return (pattern * (BIG_BODY_BYTES // len(pattern) + 1))[:BIG_BODY_BYTES]


@app.get("/hello")
def hello():
    return jsonify(greeting="hello", args=request.args.to_dict(flat=False))


@app.post("/echo")
def echo():
    return jsonify(received=request.get_json(), pid=os.getpid())


@app.post("/form")
def form():
    return jsonify(fields=request.form.to_dict(flat=False))


@app.get("/text")
def text():
    """Plain text that reads like a form: no JSONPath rule has a field to cover in it."""
    return Response(f"password={request.args.get('password', '')}\n", mimetype="text/plain")


@app.post("/upload")
def upload():
    data = request.get_data()
    return jsonify(size=len(data))


@app.get("/big")
def big():
    return Response(big_body(), mimetype="application/octet-stream")


@app.get("/item/<int:item_id>")
def item(item_id: int):
    return jsonify(item=item_id)


@app.get("/source")
def source():
    """A file response: gunicorn sends it with sendfile(2), which the agent sees only as a size."""
    return send_file(__file__, mimetype="text/plain")


@app.get("/proxy")
def proxy():
    """Calls another service: the agent sees an outgoing (client-side) exchange. A `traceparent`
    argument is sent on as that header, as a service propagating its trace would."""
    headers = {"traceparent": request.args["traceparent"]} if "traceparent" in request.args else {}
    upstream = requests.get(request.args["url"], verify=os.environ.get("UPSTREAM_CA", True),
                            timeout=float(request.args.get("timeout", "10")), headers=headers)
    return jsonify(upstream_status=upstream.status_code, upstream_body=upstream.text)


@app.get("/boom")
def boom():
    raise ValueError("boom on purpose")


@app.get("/deep")
def deep():
    """Raises through `depth` distinct frames (Python folds repeated identical frames, so each
    is its own function): a traceback far longer than one captured chunk."""
    depth = int(request.args.get("depth", "3000"))
    sys.setrecursionlimit(depth + 1000)
    source = "\n".join(f"def f{i}():\n    return f{i + 1}()" for i in range(depth))
    source += f"\ndef f{depth}():\n    raise ValueError('deep failure')\n"
    namespace = {}
    exec(source, namespace)
    return namespace["f0"]()


if __name__ == "__main__":
    certificate = os.environ.get("TLS_CERT")
    app.run(
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "5055")),
        ssl_context=(certificate, os.environ["TLS_KEY"]) if certificate else None,
    )


@app.get("/flood")
def flood():
    """Writes `writes` single bytes to stderr, one write(2) each: a service spamming its log."""
    for _ in range(int(request.args.get("writes", "1000"))):
        os.write(2, b".")
    return jsonify(flooded=True)
