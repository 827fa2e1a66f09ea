"""Route templates: `url_path` is the template the framework's SDK reports and `path_params`
hold the converted values, from routes the agent reads in the application's own source (Flask
blueprints, FastAPI routers) or from a `--routes` OpenAPI file (a plain node server)."""
import sys

import requests

from conftest import APPS, Server, free_port


def route_of(payloads, method, raw_url):
    matches = [p for p in payloads if p["method"] == method and p["raw_url"] == raw_url]
    assert len(matches) == 1, f"{method} {raw_url}: {[(p['method'], p['raw_url']) for p in payloads]}"
    return matches[0]["url_path"], matches[0]["path_params"]


def drive(agent, base, requests_and_routes):
    """Sends each request, then checks every payload's url_path and path_params."""
    for (method, path), _ in requests_and_routes:
        response = requests.request(method, base + path, timeout=10)
        assert response.status_code == 200, (method, path, response.status_code)
    payloads = agent.wait_for(len(requests_and_routes))
    assert agent.stop() == 0
    for (method, path), expected in requests_and_routes:
        assert route_of(payloads, method, path) == expected, (method, path)
    return payloads


def test_flask_blueprints_prefixes_and_converters(agent_factory):
    port = free_port()
    server = Server([sys.executable, "routes_flask/app.py", str(port)], port)
    try:
        agent = agent_factory([server.pid])
        invoice_id = "0b9e7c1a-2f4d-4e8a-9c3b-5d6e7f8a9b0c"
        drive(agent, server.base, [
            (("GET", "/users/me"), ("/users/me", {})),
            (("GET", "/users/u-17"), ("/users/<user_id>", {"user_id": "u-17"})),
            (("GET", "/accounts/7"), ("/accounts/<int:account_id>", {"account_id": 7})),
            (("GET", "/accounts/7/files/2024/q1%20report.pdf"),
             ("/accounts/<int:account_id>/files/<path:name>", {"account_id": 7, "name": "2024/q1 report.pdf"})),
            (("GET", "/accounts/rates/0.25"), ("/accounts/rates/<float:rate>", {"rate": 0.25})),
            (("PUT", "/billing/invoices/inv-42"), ("/billing/invoices/<ref>", {"ref": "inv-42"})),
            (("GET", f"/billing/invoices/{invoice_id}"),
             ("/billing/invoices/<uuid:invoice_id>", {"invoice_id": invoice_id})),
            (("GET", "/plain?x=1"), ("/plain", {})),
        ])
        assert agent.stats()["unmatched_paths"] == 0
    finally:
        server.stop()


def test_flask_unmatched_paths_stay_raw_and_are_counted(agent_factory):
    port = free_port()
    server = Server([sys.executable, "routes_flask/app.py", str(port)], port)
    try:
        agent = agent_factory([server.pid])
        assert requests.get(f"{server.base}/nowhere/3", timeout=10).status_code == 404
        assert requests.get(f"{server.base}/users/me", timeout=10).status_code == 200
        payloads = agent.wait_for(2)
        assert agent.stop() == 0
        assert route_of(payloads, "GET", "/nowhere/3") == ("/nowhere/3", {})
        assert route_of(payloads, "GET", "/users/me") == ("/users/me", {})
        assert agent.stats()["unmatched_paths"] == 1
    finally:
        server.stop()


def test_fastapi_router_prefixes(agent_factory):
    port = free_port()
    server = Server([sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)], port,
                    cwd=APPS / "routes_fastapi")
    try:
        agent = agent_factory([server.pid])
        drive(agent, server.base, [
            # Starlette's request.path_params, which the FastAPI SDK sends, hold strings
            # unless the template names a convertor.
            (("GET", "/api/items/42"), ("/api/items/{item_id}", {"item_id": "42"})),
            (("GET", "/api/items/special"), ("/api/items/special", {})),
            (("GET", "/api/items/42/photos/a/b.png"),
             ("/api/items/{item_id:int}/photos/{rest:path}", {"item_id": 42, "rest": "a/b.png"})),
            (("GET", "/health"), ("/health", {})),
        ])
    finally:
        server.stop()


def test_openapi_routes_file_for_a_plain_node_server(agent_factory, node_server):
    agent = agent_factory([node_server.pid], "--routes", str(APPS / "routes_openapi.yaml"))
    drive(agent, node_server.base, [
        (("GET", "/v1/orders/17"), ("/v1/orders/{order_id}", {"order_id": 17})),
        (("GET", "/v1/orders/latest"), ("/v1/orders/latest", {})),
        (("GET", "/v1/customers/acme/orders/3"),
         ("/v1/customers/{customer}/orders/{order_id}", {"customer": "acme", "order_id": 3})),
        (("GET", "/v1/orders/abc"), ("/v1/orders/abc", {})),
    ])


def test_a_bad_routes_file_stops_the_agent_at_start_up(tmp_path, node_server):
    import subprocess

    from conftest import AGENT_BIN

    bad = tmp_path / "routes.yaml"
    bad.write_text("openapi: 3.0.0\ninfo: {title: x}\n")
    result = subprocess.run([str(AGENT_BIN), "--pid", str(node_server.pid), "--routes", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"--routes {bad}" in result.stderr and "paths" in result.stderr, result.stderr


def test_express_router_mounted_from_another_file(agent_factory):
    app = APPS / "routes_express"
    port = free_port()
    server = Server(["node", "server.js"], port, cwd=app)
    try:
        agent = agent_factory([server.pid])
        drive(agent, server.base, [
            (("GET", "/api/users/me"), ("/api/users/me", {})),
            (("GET", "/api/users/u-9"), ("/api/users/:id", {"id": "u-9"})),
            (("GET", "/api/orders/12"), ("/api/orders/:id(\\d+)", {"id": "12"})),
            (("GET", "/health"), ("/health", {})),
        ])
    finally:
        server.stop()


def test_django_include_prefixes_and_converters(agent_factory):
    port = free_port()
    server = Server([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"], port,
                    cwd=APPS / "routes_django")
    try:
        agent = agent_factory([server.pid])
        # The Django SDK reports request.resolver_match.route (no leading slash) and its kwargs.
        drive(agent, server.base, [
            (("GET", "/api/blog/articles/7/"), ("api/blog/articles/<int:pk>/", {"pk": 7})),
            (("GET", "/api/blog/articles/latest/"), ("api/blog/articles/latest/", {})),
            (("GET", "/api/blog/articles/hello-world/"), ("api/blog/articles/<slug:slug>/", {"slug": "hello-world"})),
            (("GET", "/api/blog/archive/2024/"), ("api/blog/archive/(?P<year>[0-9]{4})/$", {"year": "2024"})),
            (("GET", "/health/"), ("health/", {})),
        ])
    finally:
        server.stop()
