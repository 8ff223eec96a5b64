"""The review pages (issue 12 §6): annotations awaiting review, each shown with slice
previews, findings and agreement, and approved or rejected with an e-signature.

Server-rendered (Jinja2 templates, no script, no build step) so a radiologist
needs nothing but a browser. The handlers only gather what the services and
the index hold and hand the decision to ``ctx.review.decide``: the same
service, the same checks and the same audit as ``lamina review approve``.
Previews are drawn by :func:`node.web.pixels.frame_image` (the one renderer)
in the window :mod:`node.web.windows` picks, with the masks of
``ctx.annotations.masks_of`` outlined on top.

Who may look: a bearer token whose peer has the ``review`` service, or a
login with a review user's id and passphrase (checked by the review users, so
wrong passphrases count towards the lockout) giving a signed cookie
(:mod:`node.web.session`). Either way a decision still needs the signer's
passphrase in the form.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from node.annotations.states import AnnotationState
from node.audit.trail import Actor
from node.context import NodeContext
from node.review.service import DECISIONS, ReviewRefused
from node.review.users import UserRefused
from node.web.errors import WebError
from node.web.identity import Identities, require
from node.web.pixels import encode_image, frame_image
from node.web.session import COOKIE, LIFETIME_SECONDS, Session, SessionSigner
from node.web.windows import class_window

log = logging.getLogger("lamina.web")

AWAITING = (AnnotationState.CHECKED, AnnotationState.ADJUDICATED)
MAX_FORM_BYTES = 16 * 1024
MAX_PREVIEWS = 12
#: Outline colours, one per structure in order (RGB).
PALETTE = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255))
_HEX = tuple(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in PALETTE)

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a logged-in review user (``session``) or a bearer client."""

    actor: Actor
    session: Session | None

    @property
    def user_id(self) -> str:
        return self.session.user_id if self.session else ""


class ReviewPages:
    """The routes under ``/review``."""

    def __init__(self, ctx: NodeContext, identities: Identities) -> None:
        self.ctx = ctx
        self.identities = identities
        self.sessions = SessionSigner(ctx.run_dir)

    def routes(self) -> list[Route]:
        return [
            Route("/review", self.listing),
            Route("/review/login", self.login_form),
            Route("/review/login", self.login, methods=["POST"]),
            Route("/review/logout", self.logout, methods=["POST"]),
            Route("/review/annotations/{annotation_id:int}", self.annotation),
            Route("/review/annotations/{annotation_id:int}/slices/{slice:int}.png", self.preview),
            Route("/review/annotations/{annotation_id:int}/decide", self.decide,
                  methods=["POST"]),
        ]

    # --- who is looking ----------------------------------------------------------------

    def _viewer(self, request: Request) -> Viewer | None:
        """The viewer, None without credentials (send to the login page), or 401/403."""
        address = request.client.host if request.client else ""
        if request.headers.get("authorization"):
            caller = self.identities.caller(request.headers["authorization"], address)
            require(caller, "review")
            return Viewer(caller.actor, None)
        session = self.sessions.read(request.cookies.get(COOKIE))
        if session is None:
            return None
        return Viewer(Actor(address=address, association_id=f"web-{session.session_id[:16]}",
                            user=f"web:{session.user_id}"), session)

    def _page(self, request: Request, name: str, viewer: Viewer | None, status: int = 200,
              **context: Any) -> Response:
        csrf = self.sessions.csrf(viewer.session) if viewer and viewer.session else ""
        return templates.TemplateResponse(request, name, {"viewer": viewer, "csrf": csrf,
                                                          **context}, status_code=status,
                                          headers={"Cache-Control": "no-store"})

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        """The posted urlencoded form. Parsed with the standard library: Starlette's
        ``request.form()`` needs python-multipart, which this node does not install."""
        if request.headers.get("content-type", "").split(";")[0].strip() != \
                "application/x-www-form-urlencoded":
            raise WebError(415, "forms are posted as application/x-www-form-urlencoded")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise WebError(413, "the form is too large")
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

    def _checked_csrf(self, viewer: Viewer, form: dict[str, str]) -> None:
        """Cookie sessions must send the session's CSRF token; a bearer header cannot be
        forged by another site's page, so bearer clients need none."""
        if viewer.session and not self.sessions.csrf_ok(viewer.session, form.get("csrf")):
            raise WebError(403, "the form is stale or was not sent by this page (CSRF)")

    # --- login -----------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self._page(request, "review/login.html", None)

    async def login(self, request: Request) -> Response:
        form = await self._form(request)
        user_id, passphrase = form.get("user_id", "").strip(), form.get("passphrase", "")
        address = request.client.host if request.client else ""
        actor = Actor(address=address, user=f"web:{user_id}")
        try:
            if not user_id or not passphrase:
                raise UserRefused("user id and passphrase are required")
            # Wrong passphrases count towards the lockout, as a signature's do.
            await run_in_threadpool(self.ctx.review.users.unlock, user_id, passphrase, actor)
        except UserRefused as exc:
            return self._page(request, "review/login.html", None, 401, error=str(exc),
                              user_id=user_id)
        await run_in_threadpool(self.ctx.audit.record, "user.authentication", actor,
                                {"user_id": user_id, "via": "review page"})
        response = RedirectResponse("/review", status_code=303)
        response.set_cookie(COOKIE, self.sessions.issue(user_id), max_age=LIFETIME_SECONDS,
                            httponly=True, samesite="strict", path="/review",
                            secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        viewer = self._viewer(request)
        if viewer is not None:
            self._checked_csrf(viewer, await self._form(request))
        response = RedirectResponse("/review/login", status_code=303)
        response.delete_cookie(COOKIE, path="/review")
        return response

    # --- pages -----------------------------------------------------------------------

    def listing(self, request: Request) -> Response:
        viewer = self._viewer(request)
        if viewer is None:
            return RedirectResponse("/review/login", status_code=303)
        with self.ctx.index.reader() as r:
            rows = [row for state in AWAITING for row in r.annotations.list(state=str(state))]
        rows.sort(key=lambda row: row["id"])
        return self._page(request, "review/list.html", viewer, annotations=rows)

    def annotation(self, request: Request) -> Response:
        viewer = self._viewer(request)
        if viewer is None:
            return RedirectResponse("/review/login", status_code=303)
        return self._annotation_page(request, viewer, request.path_params["annotation_id"])

    def _annotation_page(self, request: Request, viewer: Viewer, annotation_id: int,
                         status: int = 200, **extra: Any) -> Response:
        view = self._gather(annotation_id)
        return self._page(request, "review/annotation.html", viewer, status, **view,
                          palette=_HEX, **extra)

    def _gather(self, annotation_id: int) -> dict[str, Any]:
        """What the annotation page shows, read in one reader."""
        with self.ctx.index.reader() as r:
            row = r.annotations.get(annotation_id)
            if row is None:
                raise WebError(404, f"unknown annotation {annotation_id}")
            check = row["current_check_fk"]
            structures = r.annotations.structures(check) if check else []
            findings = r.annotations.findings(check) if check else []
            comparisons = [c for c in r.agreement.comparisons()
                           if annotation_id in (c["annotation_a"], c["annotation_b"])]
            agreement = [(c, r.agreement.structures(c["id"])) for c in comparisons]
            signatures = r.signatures.list(annotation_id)
        for finding in findings:
            finding["slices"] = json.loads(finding["slices"])
        return {"annotation": row, "structures": structures, "findings": findings,
                "agreement": agreement, "signatures": [
                    json.loads(s.manifest) | {"id": s.id} for s in signatures],
                "previews": _preview_slices(structures, findings),
                "awaiting": row["state"] in AWAITING}

    def preview(self, request: Request) -> Response:
        """One slice of the annotated series in the class's review window, every structure
        on it outlined in its colour."""
        if self._viewer(request) is None:
            raise WebError(401, "log in first")
        annotation_id, k = request.path_params["annotation_id"], request.path_params["slice"]
        try:
            grid, masks = self.ctx.annotations.masks_of(annotation_id)
        except LookupError as exc:
            raise WebError(404, str(exc)) from None
        if not 1 <= k <= grid.shape[0]:
            raise WebError(404, f"slice {k} is not in the series (1-{grid.shape[0]})")
        with self.ctx.index.reader() as r:
            sha = r.instances.blob_of(grid.sop_instance_uids[k - 1])
            row = r.annotations.get(annotation_id)
            check = row["current_check_fk"] if row else None
            structures = r.annotations.structures(check) if check else []
        order = [s["structure_id"] for s in structures]  # the page's colour key
        if sha is None:
            raise WebError(404, "the slice is not stored")
        protocol = self.ctx.annotations.protocol
        window = class_window(protocol, [s["class_key"] for s in structures])
        image = frame_image(self.ctx.blobs.local_path(sha), 1, window).convert("RGB")
        pixels = np.array(image)
        for n, mask in enumerate(masks):
            colour = order.index(mask.structure_id) if mask.structure_id in order else n
            pixels[_outline(mask.slice_mask(k - 1))] = PALETTE[colour % len(PALETTE)]
        return Response(encode_image(Image.fromarray(pixels), "image/png"),
                        media_type="image/png", headers={"Cache-Control": "no-store"})

    # --- the decision ----------------------------------------------------------------

    async def decide(self, request: Request) -> Response:
        viewer = self._viewer(request)
        if viewer is None:
            raise WebError(401, "log in first")
        annotation_id = request.path_params["annotation_id"]
        form = await self._form(request)
        self._checked_csrf(viewer, form)
        decision = form.get("decision", "")
        if decision not in DECISIONS:
            raise WebError(400, "decision must be approve or reject")
        user_id = form.get("user_id", "").strip()
        if viewer.session and user_id != viewer.session.user_id:
            return await run_in_threadpool(
                self._annotation_page, request, viewer, annotation_id, 403,
                error=f"sign as the user logged in ({viewer.session.user_id})")
        try:
            signed = await run_in_threadpool(
                self.ctx.review.decide, annotation_id, decision, user_id,
                form.get("passphrase", ""), form.get("meaning", ""), viewer.actor,
                form.get("reason", ""))
        except ReviewRefused as exc:
            return await run_in_threadpool(self._annotation_page, request, viewer,
                                           annotation_id, _refusal_status(str(exc)),
                                           error=str(exc), form=form)
        return RedirectResponse(f"/review/annotations/{annotation_id}?signed="
                                f"{signed.signature_id}", status_code=303)


def _refusal_status(reason: str) -> int:
    """The HTTP status of a refused decision: 404 unknown annotation, 409 the annotation
    cannot take it (its state, a change meanwhile, self-approval), 403 the signer was not
    authenticated, 400 a field is missing."""
    if reason.startswith("unknown annotation"):
        return 404
    if "cannot become" in reason or "changed while" in reason or "self-approval" in reason:
        return 409
    if "required" in reason or "needs a reason" in reason:
        return 400
    return 403


def _outline(plane: np.ndarray) -> np.ndarray:
    """The mask's border pixels: set, with a 4-neighbour outside the mask."""
    padded = np.pad(plane, 1)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return plane & ~inner


def _preview_slices(structures: list[dict], findings: list[dict]) -> list[int]:
    """1-based slices worth a look: each structure's middle slice and ends, then every
    slice a finding names, at most :data:`MAX_PREVIEWS`."""
    wanted: list[int] = []
    for s in structures:
        if s["first_slice"] is not None:
            first, last = s["first_slice"], s["last_slice"]
            wanted += [(first + last) // 2, first, last]
    for f in findings:
        wanted += [int(x["slice"]) for x in f["slices"] if x.get("slice")]
    out: list[int] = []
    for k in wanted:
        if k not in out:
            out.append(k)
    return sorted(out[:MAX_PREVIEWS])
