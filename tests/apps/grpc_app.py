"""A gRPC service and client (grpcio over h2c) with raw-bytes messages, so no generated code:
    python grpc_app.py server   serves shop.Catalog on $PORT
    python grpc_app.py client   prints "ready", waits for a line on stdin, then calls
                                Get, List and Fail on $PORT and prints one JSON line per call
"""
import json
import os
import sys
from concurrent import futures

import grpc

SERVICE = "shop.Catalog"


def get(request, context):
    return b"item:" + request


def list_items(request, context):
    for n in range(3):
        yield f"{request.decode()}-{n}".encode()


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such item")


def serve(port: int) -> None:
    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "List": grpc.unary_stream_rpc_method_handler(list_items),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def call(port: int) -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        got = channel.unary_unary(f"/{SERVICE}/Get")(b"7", timeout=10)
        print(json.dumps({"get": got.decode()}), flush=True)
        items = [item.decode() for item in channel.unary_stream(f"/{SERVICE}/List")(b"shelf", timeout=10)]
        print(json.dumps({"list": items}), flush=True)
        try:
            channel.unary_unary(f"/{SERVICE}/Fail")(b"9", timeout=10)
        except grpc.RpcError as error:
            print(json.dumps({"fail": error.code().name, "details": error.details()}), flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "50051"))
    serve(port) if sys.argv[1] == "server" else call(port)
