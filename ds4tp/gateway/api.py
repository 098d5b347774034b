"""The OpenAI-compatible HTTP API (FastAPI).

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as SSE or
not), GET /health (200 / 503 with the reason), GET /metrics (Prometheus text). With an API key
configured, /v1/* need `Authorization: Bearer <key>`; /health and /metrics stay open.

The gateway owns tokenization and the chat template; the workers see token ids only.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for malformed
JSON, unknown top-level fields (`param` names the first; see schemas.py), wrong types or values
and prompts over the context; 401 for a bad or missing key; 404 for an unknown model or route;
503 when the workers are unavailable or the queue is full. Once a stream has started, an error
arrives as a final `data: {"error": ...}` event.

Streaming sends `: keep-alive` comments while nothing else is ready (a long prefill, or other
requests' turns), the first data chunk only once the first token is sampled, then one chunk per
token that adds visible text (`token_ids` lists the tokens a chunk covers when the request sets
`return_token_ids`), a final chunk with the finish reason, a usage chunk with
`stream_options.include_usage`, and `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import traceback
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ds4tp import tokenizer as tk
from ds4tp.gateway.metrics import Metrics
from ds4tp.gateway.scheduler import (Chunk, Done, Failed, Generation, Limits, QueueFull, Scheduler,
                                     SchedulerConfig)
from ds4tp.gateway.schemas import ChatRequest, CompletionRequest
from ds4tp.gateway.textstream import TextStream
from ds4tp.rpc import pb


@dataclass
class GatewayConfig:
    served_model: str = "deepseek-v4-flash"
    api_key: str | None = None
    keepalive_s: float = 5.0
    completion_default_max_tokens: int = 16   # OpenAI's legacy default for /v1/completions
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    # unknown top-level fields first, all of them named (OpenAI: "Unrecognized request argument")
    unknown = [str(x["loc"][0]) for x in errors if x["type"] == "extra_forbidden" and len(x["loc"]) == 1]
    if unknown:
        names = ", ".join(repr(n) for n in unknown)
        return APIError(400, f"unknown parameter{'s' if len(unknown) > 1 else ''} {names} "
                        f"(not accepted by this endpoint)", param=unknown[0])
    err = errors[0]
    parts = []
    for x in err["loc"]:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif parts and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none")
                        or x.startswith(("function-", "literal", "nullable", "union", "json-or"))):
            continue   # pydantic's union-branch tags, not field names
        else:
            parts.append(("." if parts else "") + x)
    param = "".join(parts) or None
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def create_app(cfg: GatewayConfig, pool, tokenizer) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(pool, cfg.scheduler)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await pool.start()
        scheduler.start()
        yield
        await scheduler.stop()
        await pool.close()

    app = FastAPI(title="ds4tp", lifespan=lifespan)
    app.state.pool, app.state.scheduler, app.state.metrics = pool, scheduler, metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        traceback.print_exception(e)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                       type="server_error", code="internal_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, str(e.detail), code=kind))

    app.add_middleware(AuthAndCount, api_key=cfg.api_key, metrics=metrics)

    # -- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        d = pool.describe()
        d["status"] = "ok" if pool.healthy else "unavailable"
        d["queue_depth"], d["active"] = scheduler.queue_depth, len(scheduler.active)
        return JSONResponse(d, status_code=200 if pool.healthy else 503)

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(pool=pool, scheduler=scheduler),
                                 media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": cfg.served_model, "object": "model", "created": created, "owned_by": "ds4tp",
                "max_model_len": pool.ctx or None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.served_model:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    # -- generation -----------------------------------------------------------------------------
    async def parse(request: Request, schema):
        raw = await request.body()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = schema.model_validate(obj)
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != cfg.served_model:
            raise APIError(404, f"the model {req.model!r} does not exist (this server serves "
                           f"{cfg.served_model!r})", param="model", code="model_not_found")
        return req

    def check_ready():
        if not pool.healthy:
            raise APIError(503, f"workers unavailable: {pool.reason}", type="server_error",
                           code="workers_unavailable")

    def sampling(req, top_logprobs: int) -> pb.Sampling:
        s = pb.Sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0,
            seed=(req.seed if req.seed is not None else secrets.randbits(63)) & ((1 << 64) - 1),
            top_logprobs=top_logprobs)
        for k, b in (req.logit_bias or {}).items():
            t = int(k)
            if not 0 <= t < tokenizer.n_vocab:
                raise APIError(400, f"logit_bias: token {t} is outside the vocabulary", param="logit_bias")
            s.logit_bias[t] = b
        return s

    def limits(req, prompt_len: int, default_max: int | None, param: str) -> Limits:
        ctx = pool.ctx
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {ctx} "
                           f"tokens (and at least one must be left to generate)",
                           param=param, code="context_length_exceeded")
        room = ctx - prompt_len
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max or room
        return Limits(max_tokens=min(asked, room), min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)

    def submit(gen: Generation) -> Generation:
        try:
            scheduler.submit(gen)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}", type="server_error", code="queue_full") from None
        return gen

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        check_ready()
        thinking = req.thinking_mode()
        use_tools = bool(req.tools) and req.tool_choice != "none"
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        try:
            text = tk.render_chat(messages, thinking=thinking, tools=tools, ctx=pool.ctx)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        prompt = await asyncio.to_thread(tokenizer.encode_rendered, text)
        lim = limits(req, len(prompt), None, "messages")
        n_top = (req.top_logprobs or 0) if req.logprobs else 0
        gen = submit(Generation(
            prompt, sampling(req, n_top), lim,
            TextStream(tokenizer, thinking=thinking != "none", stop=req.stop or [], tools=use_tools),
            eos=tokenizer.eos, want_logprobs=req.logprobs))
        out = ChatOutput(req, gen, thinking != "none", tokenizer, cfg.served_model)
        return await respond(request, req, gen, out)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        check_ready()
        if isinstance(req.prompt, str):
            prompt = await asyncio.to_thread(tokenizer.encode_rendered, req.prompt)
            if not prompt or prompt[0] != tokenizer.bos:
                prompt = [tokenizer.bos] + prompt
        else:
            prompt = list(req.prompt)
            bad = [t for t in prompt if not 0 <= t < tokenizer.n_vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary", param="prompt")
        lim = limits(req, len(prompt), cfg.completion_default_max_tokens, "prompt")
        gen = submit(Generation(prompt, sampling(req, req.logprobs or 0), lim,
                                TextStream(tokenizer, stop=req.stop or []), eos=tokenizer.eos,
                                want_logprobs=req.logprobs is not None))
        out = CompletionOutput(req, gen, tokenizer, cfg.served_model)
        return await respond(request, req, gen, out)

    async def respond(request: Request, req, gen: Generation, out):
        if req.stream:
            return StreamingResponse(stream(request, req, gen, out), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        state = {}
        try:
            while True:
                ev = await next_event(request, gen, state)
                if ev is None:
                    return JSONResponse({}, status_code=499)   # client gone; nobody reads this
                if isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message, type="server_error" if ev.status >= 500
                                   else "invalid_request_error", code=ev.code)
                out.add(ev)
                if isinstance(ev, Done):
                    return JSONResponse(out.whole())
        finally:
            finish(gen)

    async def next_event(request: Request, gen: Generation, state: dict):
        """The generation's next event; None if the client disconnected (checked every 0.5 s,
        whether events flow or not)."""
        get = asyncio.ensure_future(gen.events.get())
        try:
            while True:
                wait = max(0.0, state.setdefault("check_at", time.monotonic() + 0.5) - time.monotonic())
                done, _ = await asyncio.wait({get}, timeout=wait)
                if time.monotonic() >= state["check_at"]:
                    state["check_at"] = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        return None
                if done:
                    return get.result()
        finally:
            if not get.done():
                get.cancel()

    async def stream(request: Request, req, gen: Generation, out):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        get = None
        try:
            while True:
                get = get or asyncio.ensure_future(gen.events.get())
                done, _ = await asyncio.wait({get}, timeout=cfg.keepalive_s)
                if not done:
                    yield ": keep-alive\n\n"
                    continue
                ev, get = get.result(), None
                if isinstance(ev, Failed):
                    yield sse(APIError(ev.status, ev.message, type="server_error", code=ev.code).body())
                    return
                for chunk in out.chunks(ev, include_usage):
                    yield sse(chunk)
                if isinstance(ev, Done):
                    if include_usage:
                        yield sse(out.usage_chunk())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if get is not None and not get.done():
                get.cancel()
            finish(gen)

    def finish(gen: Generation):
        """The response is over (sent, failed or abandoned)."""
        if not gen.finished:
            scheduler.cancel(gen)
        if gen.started or gen.generated:
            metrics.finished(gen)

    return app


class AuthAndCount:
    """ASGI middleware: the API key check on /v1/* and the request counter. (A plain ASGI
    class, not BaseHTTPMiddleware, so streaming responses see client disconnects.)"""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _auth_error(self, scope) -> APIError | None:
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        scheme, _, key = header.partition(" ")
        if not header:
            return APIError(401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            err = self._auth_error(scope) if self.api_key else None
            if err is not None:
                await error_response(err)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(endpoint, status[0])


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- response bodies ---------------------------------------------------------------------------
class _Output:
    """Accumulates a generation's events into OpenAI response bodies."""

    object_whole = object_chunk = ""

    def __init__(self, req, gen: Generation, tokenizer, model: str, prefix: str):
        self.req, self.gen, self.tok, self.model = req, gen, tokenizer, model
        self.id = prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.reasoning = ""
        self.content = ""
        self.tool_calls = []
        self.finish_reason = None
        self.logprobs = []
        self.token_ids = []

    def add(self, ev) -> None:
        d = ev.delta if isinstance(ev, Chunk) else ev.tail
        self.reasoning += d.reasoning
        self.content += d.content
        self.logprobs += ev.logprobs
        self.token_ids += ev.token_ids
        if isinstance(ev, Done):
            self.tool_calls, self.finish_reason = ev.tool_calls, ev.finish_reason

    def usage(self) -> dict:
        g = self.gen
        return {"prompt_tokens": len(g.prompt), "completion_tokens": len(g.generated),
                "total_tokens": len(g.prompt) + len(g.generated),
                "prompt_tokens_details": {"cached_tokens": g.reused},
                "completion_tokens_details": {"reasoning_tokens": g.text.reasoning_tokens}}

    def token_text(self, t: int) -> str:
        return self.tok.token_bytes(t).decode("utf-8", errors="replace")

    def _chunk(self, choice: dict, include_usage: bool) -> dict:
        c = {"id": self.id, "object": self.object_chunk, "created": self.created,
             "model": self.model, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return c

    def _final(self, choice: dict, include_usage: bool) -> dict:
        """The finish_reason chunk. Without include_usage it carries the usage itself (usage is
        always reported); with it, a separate usage chunk follows, as OpenAI sends it."""
        c = self._chunk(choice, include_usage)
        if not include_usage:
            c["usage"] = self.usage()
        return c

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage()}


class ChatOutput(_Output):
    object_whole, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, req, gen, thinking: bool, tokenizer, model):
        super().__init__(req, gen, tokenizer, model, "chatcmpl-")
        self.thinking = thinking
        self._sent_role = False

    def _logprobs(self, entries) -> dict | None:
        if not self.req.logprobs:
            return None

        def item(t, lp):
            s = self.token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [dict(item(t, lp), top_logprobs=[item(a, alp) for a, alp in top])
                            for t, lp, top in entries]}

    def chunks(self, ev, include_usage: bool) -> list[dict]:
        self.add(ev)
        d = ev.delta if isinstance(ev, Chunk) else ev.tail
        out = []
        delta = {}
        if not self._sent_role:
            delta["role"], self._sent_role = "assistant", True
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content or (not d.reasoning and isinstance(ev, Chunk)):
            delta["content"] = d.content
        if delta or isinstance(ev, Chunk):
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(ev.logprobs),
                      "finish_reason": None}
            if self.req.return_token_ids:
                choice["token_ids"] = ev.token_ids
            out.append(self._chunk(choice, include_usage))
        if isinstance(ev, Done):
            delta = {}
            if ev.tool_calls:
                delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(ev.tool_calls)]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}
            out.append(self._final(choice, include_usage))
        return out

    def whole(self) -> dict:
        msg = {"role": "assistant", "content": self.content if (self.content or not self.tool_calls) else None}
        if self.thinking:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        choice = {"index": 0, "message": msg, "logprobs": self._logprobs(self.logprobs),
                  "finish_reason": self.finish_reason}
        if self.req.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {"id": self.id, "object": self.object_whole, "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage()}


class CompletionOutput(_Output):
    object_whole = object_chunk = "text_completion"

    def __init__(self, req, gen, tokenizer, model):
        super().__init__(req, gen, tokenizer, model, "cmpl-")
        self._echoed = not req.echo

    def _logprobs(self, entries) -> dict | None:
        if self.req.logprobs is None:
            return None
        toks = [self.token_text(t) for t, _, _ in entries]
        return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.token_text(a): alp for a, alp in top} for _, _, top in entries],
                "text_offset": []}

    def _echo(self) -> str:
        if self._echoed:
            return ""
        self._echoed = True
        return self.req.prompt if isinstance(self.req.prompt, str) else self.tok.decode(self.gen.prompt)

    def chunks(self, ev, include_usage: bool) -> list[dict]:
        self.add(ev)
        d = ev.delta if isinstance(ev, Chunk) else ev.tail
        out = []
        text = self._echo() + d.content
        if text or isinstance(ev, Chunk):
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(ev.logprobs),
                      "finish_reason": None}
            if self.req.return_token_ids:
                choice["token_ids"] = ev.token_ids
            out.append(self._chunk(choice, include_usage))
        if isinstance(ev, Done):
            out.append(self._final({"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": ev.finish_reason}, include_usage))
        return out

    def whole(self) -> dict:
        choice = {"index": 0, "text": self._echo() + self.content,
                  "logprobs": self._logprobs(self.logprobs), "finish_reason": self.finish_reason}
        if self.req.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {"id": self.id, "object": self.object_whole, "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage()}
