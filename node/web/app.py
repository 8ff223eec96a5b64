"""``build_app(ctx)``: the node's HTTP app, on the same context as the DIMSE server.

Every DICOMweb route runs inside :func:`_guarded`: the caller is identified
(bearer token → peer, :mod:`node.web.identity`), the DICOMweb root URL worked
out (from ``X-Forwarded-*`` only when ``http.forwarded`` is set, so a client
cannot steer the URLs otherwise), the work run off the event loop when it
blocks, a refusal turned into its 4xx with a JSON reason, and the request
counted. Health and metrics need no token.
"""

from __future__ import annotations

import html
import inspect
import logging
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route

from node.context import NodeContext
from node.metrics import Metrics
from node.storage.interface import IndexUnavailable
from node.web.dicomweb import DicomWeb
from node.web.errors import WebError
from node.web.health import livez, make_readyz
from node.web.identity import Identities
from node.web.metrics import exposition
from node.web.review import ReviewPages

log = logging.getLogger("lamina.web")


def _refusal(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"status": status, "reason": reason}, status_code=status,
                        headers=headers)


def root_url(request: Request, base_path: str, forwarded: bool) -> str:
    """The DICOMweb root as the client reaches it (RetrieveURL, BulkDataURI)."""
    scheme, host, prefix = request.url.scheme, request.url.netloc, ""
    server = request.scope.get("server")
    if not forwarded and server and request.url.port is None and server[1] not in (80, 443):
        # A client that leaves the port out of Host (dicomweb-client does) reached this socket.
        host = f"{request.url.hostname}:{server[1]}"
    if forwarded:
        h = request.headers
        scheme = h.get("x-forwarded-proto", scheme).split(",")[0].strip() or scheme
        host = h.get("x-forwarded-host", host).split(",")[0].strip() or host
        prefix = h.get("x-forwarded-prefix", "").split(",")[0].strip().rstrip("/")
    return f"{scheme}://{host}{prefix}{base_path}"


def build_app(ctx: NodeContext) -> Starlette:
    """The Starlette app serving ``ctx``: DICOMweb under ``http.base_path``, the review
    pages under ``/review``, plus ``/livez``, ``/readyz`` and ``/metrics``."""
    http = ctx.settings.http
    identities = Identities(ctx.settings)
    metrics = Metrics.get()
    web = DicomWeb(ctx, metrics)

    def guarded(route: Route) -> Route:
        endpoint = route.endpoint
        blocking = not inspect.iscoroutinefunction(endpoint)
        template = route.path

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                client = request.client.host if request.client else ""
                request.state.caller = identities.caller(request.headers.get("authorization"),
                                                         client)
                request.state.root = root_url(request, http.base_path, http.forwarded)
                if blocking:
                    response = await run_in_threadpool(endpoint, request)
                else:
                    response = await endpoint(request)
            except WebError as exc:
                response = _refusal(exc.status, exc.reason, exc.headers)
            except IndexUnavailable:
                response = _refusal(503, "index unavailable")
            metrics.requests.labels(request.method, template, str(response.status_code)).inc()
            metrics.request_seconds.labels(template).observe(time.perf_counter() - started)
            return response

        return Route(route.path, run, methods=sorted(route.methods or {"GET"}))

    def paged(route: Route) -> Route:
        """A review page's route: refusals answered as a short HTML page, requests counted."""
        endpoint = route.endpoint
        blocking = not inspect.iscoroutinefunction(endpoint)

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if blocking:
                    response = await run_in_threadpool(endpoint, request)
                else:
                    response = await endpoint(request)
            except WebError as exc:
                response = HTMLResponse(f"<!doctype html><title>{exc.status}</title>"
                                        f"<p id=\"error\">{html.escape(exc.reason)}</p>"
                                        '<p><a href="/review">Review</a></p>',
                                        status_code=exc.status, headers=exc.headers)
            except IndexUnavailable:
                response = HTMLResponse("<p>index unavailable</p>", status_code=503)
            metrics.requests.labels(request.method, route.path, str(response.status_code)).inc()
            metrics.request_seconds.labels(route.path).observe(time.perf_counter() - started)
            return response

        return Route(route.path, run, methods=sorted(route.methods or {"GET"}))

    def scrape(request: Request) -> Response:
        body, content_type = exposition(ctx)
        return Response(body, media_type=content_type)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _refusal(exc.status_code, exc.detail or "not found")

    routes = [Route("/livez", livez), Route("/readyz", make_readyz(ctx)),
              Route("/metrics", scrape),
              *(paged(r) for r in ReviewPages(ctx, identities).routes()),
              Mount(http.base_path or "/", routes=[guarded(r) for r in web.routes()])]
    middleware = []
    if http.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(http.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Content-Type", "Warning", "Content-Location"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: not_found})
