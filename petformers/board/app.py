"""The board's web server: a Starlette app serving one static page, a JSON API and server-sent events.

Starlette + uvicorn (small, established ASGI stack); the page is plain HTML/JS with uPlot vendored as a
pinned file in `static/`, so nothing is fetched from the network and nothing is built. Live updates
come as server-sent events: the server polls the run files (a few stat calls every half second) and
sends only new metrics lines, so a browser never reloads.

Routes: `/` the page; `/static/<file>` its assets; `/api/runs`; `/api/run?name=`; `/api/diff?run=&run=`;
`/api/events?run=...` (SSE: run list, states, new metrics); `/api/file?run=&path=` (a file of a run);
`POST /api/chat` (SSE: streamed generation).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from petformers.board import runs as rundirs
from petformers.board.chat import ChatModels

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "board.js": "text/javascript", "board.css": "text/css",
                "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
POLL_SECONDS = 0.5
RUN_LIST_SECONDS = 2.0


def _json_safe(value):
    """NaN/inf (JSON has none) as null, so that the browser's JSON.parse never fails."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json(obj, status: int = 200) -> JSONResponse:
    return JSONResponse(_json_safe(obj), status_code=status)


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(_json_safe(data), ensure_ascii=False, default=str)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(output_root: str | Path, allowed_hosts: list[str] | None = None) -> Starlette:
    """The board of every run under `output_root`. `allowed_hosts` (Host headers accepted; all when None)
    keeps a loopback-bound board from answering pages of other sites (DNS rebinding)."""
    root = Path(output_root).resolve()
    chat_models = ChatModels()

    def run_list() -> list[dict]:
        rows = []
        for name in rundirs.find_runs(root):
            try:
                rows.append(rundirs.run_summary_line(root, name))
            except (rundirs.OutsideRoot, OSError):
                continue  # removed while listing
        return rows

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def static(request: Request):
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: no path from the request reaches the filesystem
            return Response("not found", status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    async def api_runs(request: Request):
        return _json({"root": str(root), "runs": run_list()})

    async def api_run(request: Request):
        try:
            return _json(rundirs.run_detail(root, request.query_params.get("name", "")))
        except rundirs.OutsideRoot as e:
            return _json({"error": str(e)}, 404)

    async def api_diff(request: Request):
        names = request.query_params.getlist("run")
        configs, notes = {}, []
        for name in names:
            try:
                _, parsed, note = rundirs.read_run_config(rundirs.run_path(root, name))
            except rundirs.OutsideRoot as e:
                return _json({"error": str(e)}, 404)
            configs[name] = parsed
            if note:
                notes.append(f"{name}: {note}")
        return _json({"runs": names, "rows": rundirs.config_diff(configs), "notes": notes})

    async def api_file(request: Request):
        try:
            run = rundirs.run_path(root, request.query_params.get("run", ""))
            path = rundirs.confined(run, request.query_params.get("path", ""))
        except rundirs.OutsideRoot as e:
            return _json({"error": str(e)}, 404)
        if not path.is_file():
            return _json({"error": "not a file"}, 404)
        media = {".json": "application/json", ".jsonl": "text/plain; charset=utf-8", ".yaml": "text/plain; charset=utf-8",
                 ".png": "image/png", ".html": "text/html", ".log": "text/plain; charset=utf-8"}.get(path.suffix,
                                                                                             "application/octet-stream")
        return FileResponse(path, media_type=media)

    async def api_events(request: Request):
        watched = request.query_params.getlist("run")

        async def stream():
            offsets: dict[str, tuple[int, int]] = {}
            states: dict[str, tuple] = {}
            last_list, list_sent = None, 0.0
            loop = asyncio.get_running_loop()
            yield "retry: 1000\n\n"
            while not await request.is_disconnected():
                now = loop.time()
                if now - list_sent >= RUN_LIST_SECONDS:
                    rows = await asyncio.to_thread(run_list)
                    key = [(r["name"], r["state"], r["reason"]) for r in rows]
                    if key != last_list:
                        yield _sse("runs", {"runs": rows})
                        last_list = key
                    list_sent = now
                for name in watched:
                    try:
                        run = rundirs.run_path(root, name)
                    except rundirs.OutsideRoot as e:
                        if states.get(name) != ("missing",):
                            yield _sse("problem", {"run": name, "error": str(e)})
                            states[name] = ("missing",)
                        continue
                    state = rundirs.run_state(run)
                    offset, line = offsets.get(name, (0, 0))
                    size = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").is_file() else 0
                    reset = size < offset  # the file was replaced (a new run in the same directory)
                    if reset:
                        offset, line = 0, 0
                    final = state[0] != "running"
                    if size != offset or reset or (final and states.get(name, (None,))[0] == "running"):
                        chunk = await asyncio.to_thread(rundirs.read_metrics_since, run, offset, line, final)
                        offsets[name] = (chunk.offset, chunk.line)
                        if chunk.records or chunk.errors or reset:
                            yield _sse("metrics", {"run": name, "records": chunk.records, "errors": chunk.errors,
                                                   "reset": reset})
                    if states.get(name) != state:
                        yield _sse("state", {"run": name, "state": state[0], "reason": state[1]})
                        states[name] = state
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    async def api_chat(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _json({"error": "send JSON (Content-Type: application/json)"}, 415)
        try:
            body = await request.json()
            run = rundirs.run_path(root, str(body.get("run", "")))
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in body.get("messages", [])]
            if not messages or messages[-1]["role"] != "user":
                raise ValueError("messages must end with a user message")
        except rundirs.OutsideRoot as e:
            return _json({"error": str(e)}, 404)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return _json({"error": f"bad chat request: {e}"}, 400)
        pieces = chat_models.stream(run, messages, body.get("max_new_tokens", 128), body.get("system") or None)

        async def stream():
            async for kind, text in iterate_in_threadpool(pieces):
                yield _sse(kind, {"text": text})

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    routes = [Route("/", page), Route("/static/{name}", static), Route("/api/runs", api_runs),
              Route("/api/run", api_run), Route("/api/diff", api_diff), Route("/api/file", api_file),
              Route("/api/events", api_events), Route("/api/chat", api_chat, methods=["POST"])]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)
