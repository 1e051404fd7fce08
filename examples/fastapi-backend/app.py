"""Example FastAPI service of the kind outrider fronts.

A small product catalogue with REST, GraphQL, an OpenAI-compatible chat stand-in and
an ONNX risk model served with onnxruntime. Every endpoint (except /healthz) waits a
configurable time before answering, standing in for database or model latency, so the
effect of outrider's caching is visible in the response times.

Run:
    cd examples/fastapi-backend
    pip install -r requirements.txt
    python3 -m uvicorn app:app --host 127.0.0.1 --port 8000

Environment:
    APP_DELAY_MS         simulated work per request in milliseconds (default 20);
                         `?delay_ms=N` on any request overrides it for that request
    CHAT_TOKEN_DELAY_MS  delay between streamed chat chunks (default 2)
    RISK_MODEL_PATH      ONNX model for /api/predict/risk
                         (default ../models/risk.onnx relative to this file)
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import strawberry
from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from strawberry.fastapi import GraphQLRouter

HERE = Path(__file__).resolve().parent
DEFAULT_DELAY_MS = float(os.environ.get("APP_DELAY_MS", "20"))
CHAT_TOKEN_DELAY_MS = float(os.environ.get("CHAT_TOKEN_DELAY_MS", "2"))
RISK_MODEL_PATH = Path(
    os.environ.get("RISK_MODEL_PATH", str(HERE.parent / "models" / "risk.onnx"))
)
RISK_FEATURES = 4


# --------------------------------------------------------------------------- state


class Counter:
    """Thread-safe monotonically increasing counter."""

    def __init__(self) -> None:
        self._it = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            return next(self._it)


REQUESTS = Counter()  # every request the app sees (x-app-request-count header)
WRITES = Counter()  # every write (REST POST or GraphQL mutation)

CATEGORIES = ["tools", "garden", "kitchen", "books", "toys"]


def _seed_items(n: int = 50) -> dict[int, dict[str, Any]]:
    items = {}
    for i in range(1, n + 1):
        items[i] = {
            "id": i,
            "name": f"Item {i}",
            "category": CATEGORIES[i % len(CATEGORIES)],
            "price": round(4.99 + (i * 7 % 90) + 0.5 * (i % 2), 2),
            "in_stock": i % 7 != 0,
        }
    return items


ITEMS: dict[int, dict[str, Any]] = _seed_items()
ITEMS_LOCK = threading.Lock()


def create_item(name: str, price: float, category: str) -> tuple[dict[str, Any], int]:
    counter = WRITES.next()
    with ITEMS_LOCK:
        new_id = max(ITEMS) + 1
        item = {"id": new_id, "name": name, "category": category, "price": price, "in_stock": True}
        ITEMS[new_id] = item
    return item, counter


# --------------------------------------------------------------------------- model


class RiskModel:
    """The ONNX logistic-regression model from examples/models, run with onnxruntime."""

    def __init__(self, path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.path = path

    def predict(self, rows: list[list[float]]) -> list[float]:
        x = np.asarray(rows, dtype=np.float32).reshape(-1, RISK_FEATURES)
        (out,) = self.session.run(["risk"], {self.input_name: x})
        return [float(v) for v in out.reshape(-1)]


MODEL: RiskModel | None = None


@asynccontextmanager
async def lifespan(_app: FastAPI):
    global MODEL
    MODEL = RiskModel(RISK_MODEL_PATH)
    yield


# --------------------------------------------------------------------------- app

app = FastAPI(title="outrider example backend", version="1.0.0", lifespan=lifespan)


@app.middleware("http")
async def count_requests(request: Request, call_next):
    n = REQUESTS.next()
    response = await call_next(request)
    # Lets a human (or a test) tell a cached response from a fresh one: a cache HIT
    # replays the count of the request that filled the cache.
    response.headers["x-app-request-count"] = str(n)
    return response


async def simulated_work(
    delay_ms: float | None = Query(None, ge=0, le=10_000, description="override APP_DELAY_MS"),
) -> None:
    ms = DEFAULT_DELAY_MS if delay_ms is None else delay_ms
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": code, "message": message})


@app.exception_handler(RequestValidationError)
async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # Same error shape as the rest of the API (and as outrider's own errors).
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(
        status_code=422,
        content={
            "error": "invalid_request",
            "message": f"{where}: {first.get('msg', 'invalid request')}",
            "detail": jsonable_encoder(exc.errors()),
        },
    )


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok", "model_loaded": MODEL is not None}


# ----- REST


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    price: float = Field(ge=0)
    category: str = "misc"


@app.get("/api/items", dependencies=[Depends(simulated_work)])
async def list_items(
    limit: int = Query(10, ge=1, le=100),
    offset: int = Query(0, ge=0),
    category: str | None = None,
) -> dict[str, Any]:
    with ITEMS_LOCK:
        rows = [it for it in ITEMS.values() if category is None or it["category"] == category]
    return {"items": rows[offset : offset + limit], "total": len(rows), "limit": limit, "offset": offset}


@app.get("/api/items/{item_id}", dependencies=[Depends(simulated_work)])
async def get_item(item_id: int):
    item = ITEMS.get(item_id)
    if item is None:
        return error(404, "not_found", f"item {item_id} does not exist")
    return {**item, "generated_at": time.time()}


@app.post("/api/items", status_code=201, dependencies=[Depends(simulated_work)])
async def post_item(body: ItemIn) -> dict[str, Any]:
    # A write: must never be served from a cache. `counter` increases on every call
    # that reaches the app.
    item, counter = create_item(body.name, body.price, body.category)
    return {"item": item, "counter": counter}


# ----- risk model (the Python path that outrider's in-process inference replaces)


class RiskIn(BaseModel):
    # Either a batch [[f1, f2, f3, f4], ...] or one flat row [f1, f2, f3, f4].
    features: list[list[float]] | list[float]


@app.post("/api/predict/risk", dependencies=[Depends(simulated_work)])
async def predict_risk(body: RiskIn):
    rows = body.features
    if rows and not isinstance(rows[0], list):
        rows = [rows]  # single flat row
    if not rows:
        return error(400, "invalid_features", "features must contain at least one row")
    if len(rows) > 1024:
        return error(400, "invalid_features", "at most 1024 rows per request")
    for i, row in enumerate(rows):
        if len(row) != RISK_FEATURES:
            return error(
                400, "invalid_features", f"row {i} has {len(row)} values, expected {RISK_FEATURES}"
            )
        if not all(math.isfinite(v) for v in row):
            return error(400, "invalid_features", f"row {i} contains a non-finite value")
    assert MODEL is not None
    return {"risk": MODEL.predict(rows), "model": "risk", "model_version": 1}


# ----- OpenAI-compatible chat completions stand-in


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model: str = "gpt-4o-mini"
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    user: str | None = None


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict))


def deterministic_answer(req: ChatRequest) -> tuple[list[str], str, int]:
    """The same messages always give the same answer (so caching is observable)."""
    prompt = "\n".join(f"{m.role}: {_text(m.content)}" for m in req.messages)
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    last_user = next((_text(m.content) for m in reversed(req.messages) if m.role == "user"), "")
    topic = " ".join(last_user.split()[:12]) or "(empty prompt)"
    answer = (
        f"This is a deterministic stand-in answer from {req.model}. "
        f"You asked about: {topic}. Reference {digest[:8]}."
    )
    words = answer.split(" ")
    finish = "stop"
    if req.max_tokens is not None and len(words) > req.max_tokens:
        words, finish = words[: req.max_tokens], "length"
    prompt_tokens = max(1, len(prompt.split()))
    return words, finish, prompt_tokens


@app.post("/v1/chat/completions", dependencies=[Depends(simulated_work)])
async def chat_completions(req: ChatRequest):
    words, finish, prompt_tokens = deterministic_answer(req)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(words),
        "total_tokens": prompt_tokens + len(words),
    }
    if not req.stream:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(words)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_outrider_example",
        }

    async def events():
        def chunk(delta: dict[str, Any], finish_reason: str | None) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "system_fingerprint": "fp_outrider_example",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word}, None)
            if CHAT_TOKEN_DELAY_MS > 0:
                await asyncio.sleep(CHAT_TOKEN_DELAY_MS / 1000.0)
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


# ----- GraphQL (strawberry)


@strawberry.type
class Item:
    id: int
    name: str
    category: str
    price: float
    in_stock: bool


def _to_gql(item: dict[str, Any]) -> Item:
    return Item(**{k: item[k] for k in ("id", "name", "category", "price", "in_stock")})


@strawberry.type
class Query:
    @strawberry.field(description="One item by id, or null.")
    async def item(self, id: int) -> Item | None:
        await simulated_work(None)
        it = ITEMS.get(id)
        return _to_gql(it) if it else None

    @strawberry.field(description="Items, optionally filtered by category.")
    async def items(self, limit: int = 10, category: str | None = None) -> list[Item]:
        await simulated_work(None)
        with ITEMS_LOCK:
            rows = [it for it in ITEMS.values() if category is None or it["category"] == category]
        return [_to_gql(it) for it in rows[: max(0, min(limit, 100))]]


@strawberry.type
class CreateItemResult:
    item: Item
    counter: int


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Create an item. `counter` counts every write.")
    async def create_item(self, name: str, price: float, category: str = "misc") -> CreateItemResult:
        await simulated_work(None)
        item, counter = create_item(name, price, category)
        return CreateItemResult(item=_to_gql(item), counter=counter)


schema = strawberry.Schema(query=Query, mutation=Mutation)
app.include_router(GraphQLRouter(schema), prefix="/graphql")
