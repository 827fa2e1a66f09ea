"""FastAPI app whose routes the agent reads from its source: a router with its own prefix,
included under another."""
from fastapi import FastAPI

from routers import items

app = FastAPI()
app.include_router(items.router, prefix="/api")


@app.get("/health")
async def health():
    return {"ok": True}
