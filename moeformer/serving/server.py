"""An OpenAI-compatible HTTP server (FastAPI) over one engine: `POST /v1/completions` (plain or streamed as
server-sent events), `GET /v1/models` (and `/v1/models/{name}`), `GET /health`.

    app = create_app(EngineRunner(engine), tokenizer, "my-model")
    uvicorn.run(app, port=8000)

Requests follow OpenAI's completion API: `prompt` is a string, a list of token ids (used as given), or a list of
either, one choice per prompt (`n` = 1); `top_k` is an extension (0: off). Fields are checked strictly: a value of
the wrong type, out of range, or a field the server does not know (so a misspelt or unsupported option is never
silently ignored) is an HTTP 400 whose body, `{"error": {"message", "type": "invalid_request_error", "param"}}`,
names the field. A string prompt is encoded as the model's tokenizer encodes prompts (`encode_prompt`: its special
tokens, or eos first for models trained on eos-separated documents). Stop strings end the text before them
(finish_reason "stop"), the model's eos token ends it too; a client that goes away stops its requests in the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from moeformer.serving import SamplingParams
from moeformer.serving.runner import EngineRunner, RequestStream
from moeformer.serving.text import CompletionText

DISCONNECT_POLL = 0.25  # seconds between checks that a client waiting for a whole completion is still there


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    model: str | None = None  # the served model's name (optional)
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None  # accepted for compatibility, unused

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class APIError(Exception):
    """An error answered as OpenAI answers it: `status` and {"error": {"message", "type", "param"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}},
            status_code=self.status,
        )


def validation_error(error: RequestValidationError) -> APIError:
    """A request body that failed validation as a 400 naming its field (None for malformed JSON or a body that is
    not an object); a field that fits none of its types lists what each type wanted."""
    problems = error.errors()
    first = problems[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON body{f': {detail}' if detail else ''}")
    path = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not path:
        return APIError(400, f"request body: {first.get('msg')}")
    param = path[0]
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param)
    messages = dict.fromkeys(p["msg"] for p in problems if [str(x) for x in p["loc"] if x != "body"][:1] == [param])
    return APIError(400, f"{param}: {' or '.join(messages)}", param)


def create_app(runner: EngineRunner, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `runner`'s engine as `model_name`; `tokenizer` (moeformer.training.tokenizer's
    interface) encodes string prompts and decodes completions. With `api_key`, the /v1 endpoints answer only requests
    with the header `Authorization: Bearer <api_key>` (401 otherwise). The app starts the runner when it starts and
    stops it when it shuts down."""

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401, "a valid API key is required (header Authorization: Bearer <key>)", kind="authentication_error"
            )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="moeformer", lifespan=lifespan)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), kind=kind).response()

    @app.exception_handler(APIError)
    async def _api(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not runner.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "moeformer"}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict:
        if name != model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here (this server serves {model_name!r})",
                "model",
                kind="not_found_error",
            )
        return card

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != model_name:
            raise APIError(400, f"model {body.model!r} is not served here (this server serves {model_name!r})", "model")
        prompts = _prompt_ids(body.prompt, tokenizer)
        params = SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for prompt_ids in prompts:
                streams.append(await runner.submit(f"{request_id}-{len(streams)}", prompt_ids, params))
        except BaseException as e:  # nothing runs for a request that is not answered
            for stream in streams:
                stream.abort()
            if not isinstance(e, ValueError):
                raise
            # empty prompt, ids outside the vocabulary, no room for max_tokens
            which = f"prompt {len(streams)}: " if len(prompts) > 1 else ""
            raise APIError(400, f"{which}{e}", _culprit(runner.engine, prompt_ids, body.max_tokens)) from None
        pieces = [_pieces(stream, CompletionText(tokenizer, ids, body.stop)) for stream, ids in zip(streams, prompts)]
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_events(pieces, head, prompt_tokens, usage), media_type="text/event-stream")
        collected = asyncio.ensure_future(asyncio.gather(*(_collect(p) for p in pieces)))
        while not collected.done():
            await asyncio.wait({collected}, timeout=DISCONNECT_POLL)
            if not collected.done() and await request.is_disconnected():
                collected.cancel()  # the generators' cleanup aborts the requests
                return JSONResponse({}, status_code=499)
        try:
            results = collected.result()
        except Exception as e:  # the engine failed while running these requests
            raise APIError(500, f"the engine failed: {e}", kind="server_error") from None
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason, _) in enumerate(results)
        ]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, sum(count for *_, count in results))}

    app.include_router(v1)
    return app


def _prompt_ids(prompt: str | list, tokenizer) -> list[list[int]]:
    """The token ids of each prompt of a request (strings encoded as the tokenizer encodes prompts)."""
    many = prompt if isinstance(prompt, list) and not isinstance(prompt[0], int) else [prompt]
    return [tokenizer.encode_prompt(p) if isinstance(p, str) else list(p) for p in many]


def _culprit(engine, prompt_ids: list[int], max_tokens: int) -> str:
    """The field behind the engine's refusal of a request: max_tokens when the prompt is valid and fits the context
    but leaves no room for max_tokens, else the prompt."""
    valid = bool(prompt_ids) and max(prompt_ids) < engine.vocab_size
    return "max_tokens" if valid and len(prompt_ids) < engine.max_model_len < len(prompt_ids) + max_tokens else "prompt"


async def _pieces(stream: RequestStream, text: CompletionText) -> AsyncIterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, completion tokens so far) as the request's tokens arrive; the last piece
    has the finish reason. A stop string aborts the request in the engine; so does leaving early (a client gone)."""
    count = 0
    try:
        async for out in stream:
            count += len(out.new_token_ids)
            piece = text.push(out.new_token_ids)
            if text.stopped:
                stream.abort()
                yield piece, "stop", count
                return
            if out.finished:
                piece += text.finish()
                yield piece, "stop" if text.stopped else out.finish_reason, count
                return
            if piece:
                yield piece, None, count
    finally:
        stream.abort()


async def _collect(pieces: AsyncIterator[tuple[str, str | None, int]]) -> tuple[str, str | None, int]:
    parts, last = [], ("", None, 0)
    async for last in pieces:
        parts.append(last[0])
    return "".join(parts), last[1], last[2]


async def _events(
    pieces: list[AsyncGenerator[tuple[str, str | None, int]]], head: dict, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one completion chunk per text piece of any choice, each choice's last with its finish
    reason (then a usage chunk if asked), then `[DONE]`. An engine error mid-stream ends it with an error event.
    Closed early (the client went away), it closes `pieces`, which aborts the requests."""
    counts = [0] * len(pieces)
    try:
        async for i, (piece, reason, tokens) in _merged(pieces):
            choice = {"index": i, "text": piece, "logprobs": None, "finish_reason": reason}
            yield _event({**head, "choices": [choice]})
            counts[i] = tokens
    except Exception as e:  # the engine failed: the status line is sent already, so tell the client in the stream
        yield _event({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        return
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(prompt_tokens, sum(counts))})
    yield "data: [DONE]\n\n"


async def _merged(generators: list[AsyncGenerator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async generators as their items come; on leaving, early or by an error, every
    generator is closed."""
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(generators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                pending[asyncio.ensure_future(anext(generators[i]))] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for g in generators:
            await g.aclose()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
