"""A FastAPI app for uvicorn (`uvicorn fastapi_app:app --workers 2`), never instrumented."""
import asyncio
import os
import time

import requests
from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello():
    return {"greeting": "hello", "pid": os.getpid()}


@app.get("/proxy")
async def proxy(url: str, hold: float = 0.0):
    # Blocking on purpose: the call is made by the event loop's own thread, the thread that read
    # the request, so only the server's serving model (not the thread) can tell the agent that
    # the thread serves many requests at once. `hold` keeps this worker from accepting, so
    # concurrent connections reach the other workers.
    time.sleep(hold)
    upstream = requests.get(url, timeout=10)
    return {"upstream_status": upstream.status_code, "pid": os.getpid()}


@app.get("/slow")
async def slow(seconds: float = 0.3):
    await asyncio.sleep(seconds)  # in flight on the loop while another route fails
    return {"slept": seconds}


@app.get("/boom")
async def boom():
    raise ValueError("fastapi boom on purpose")
