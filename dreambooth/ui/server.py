"""The HTTP side of `dreambooth serve` (Starlette): pages, a small JSON API, server-sent events, files.

Security, in the order a request meets it:
- a body larger than MAX_BODY (MAX_PHOTO for a photo upload) is refused (413) before it is read;
- with a token (required for any address but loopback) every request must carry it: `?token=` once (it becomes
  an HttpOnly, SameSite=Strict cookie), the cookie, or `Authorization: Bearer`; otherwise 401;
- a POST must come from a page this server served: the header X-Dreambooth-Csrf equal to the per-process secret
  in the page, and an Origin, when the browser sends one, equal to the Host it asked (a form on another site can
  set neither); otherwise 403;
- every path a request names is resolved inside its volume (volumes.inside): `..`, absolute paths and symlinks out
  are refused (404, the same as a missing file, so nothing outside is probed).
"""

import asyncio
import hmac
import io
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from dreambooth.buckets import (
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    assign_bucket,
    bucket_grid,
    bucket_name,
    image_size,
    is_mask,
    is_photo,
)
from dreambooth.fileio import atomic_path
from dreambooth.ui import forms, jobs, runs
from dreambooth.ui.volumes import OutsideVolume, Volumes, inside, is_plain_name, listing, write_new_file

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "ui"
MAX_BODY = 1 << 20  # 1 MiB: a form, a caption
MAX_PHOTO = 64 << 20  # 64 MiB: one uploaded photo (a 50-megapixel JPEG is about 25 MB, a 16-bit TIFF more)
UPLOAD = "/api/photos"  # the one route whose body may be bigger than MAX_BODY
MAX_CAPTION = 4096  # characters
COOKIE = "dreambooth_token"
POLL_SECONDS = 0.5  # how often a live page's event stream looks for new lines


class BodyLimit:
    """Refuse a request body over `limit` bytes (`limits[path]` for the paths named there): by its Content-Length,
    or while it streams in without one."""

    def __init__(self, app: ASGIApp, limit: int, limits: dict[str, int]) -> None:
        self.app, self.limit, self.limits = app, limit, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await JSONResponse({"error": f"the request is over {limit} bytes"}, 413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ValueError("request body over the limit")
            return message

        await self.app(scope, limited, send)


class Guard:
    """The token (when the server has one) on every request, the same-origin secret on every POST."""

    def __init__(self, app: ASGIApp, token: str | None, csrf: str) -> None:
        self.app, self.token, self.csrf = app, token, csrf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given, self.token):
                # the link printed at start: keep the token in a cookie, and drop it from the address bar
                response = RedirectResponse(request.url.remove_query_params("token"), 303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
            if not self._carries_token(request):
                await _refuse(401, "this page needs its token: open the link `dreambooth serve` printed")(
                    scope, receive, send
                )
                return
        if request.method not in ("GET", "HEAD") and not self._same_origin(request):
            await _refuse(403, "refused: the request did not come from this page")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _carries_token(self, request: Request) -> bool:
        cookie = request.cookies.get(COOKIE, "")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return any(v and hmac.compare_digest(v, self.token) for v in (cookie, bearer))

    def _same_origin(self, request: Request) -> bool:
        if not hmac.compare_digest(request.headers.get("x-dreambooth-csrf", ""), self.csrf):
            return False
        origin = request.headers.get("origin")
        return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _refuse(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status)


def _volumes(request: Request) -> Volumes:
    return request.app.state.volumes


def _page(request: Request, name: str, **context) -> HTMLResponse:
    state = request.app.state
    return state.templates.TemplateResponse(request, name, {"csrf": state.csrf, **context})


def _summary(request: Request, folder: Path) -> runs.RunSummary:
    return runs.summarize(_volumes(request).output, folder, started_here=jobs.alive(folder))


def _run_folder(request: Request) -> Path:
    """The run a request names (`?run=NAME`, "." for OUTPUT itself), inside /output."""
    name = request.query_params.get("run", "")
    folder = inside(_volumes(request).output, name if name not in ("", ".") else ".")
    if not runs.is_run(folder):
        raise OutsideVolume(f"{name!r} is not a run")
    return folder


async def runs_page(request: Request) -> HTMLResponse:
    return _page(request, "runs.html", runs=runs.list_runs(_volumes(request).output, started_here=jobs.alive))


async def runs_json(request: Request) -> JSONResponse:
    found = runs.list_runs(_volumes(request).output, started_here=jobs.alive)
    return JSONResponse({"runs": [r.to_dict() for r in found]})


async def run_page(request: Request) -> HTMLResponse:
    return _page(request, "run.html", run=_summary(request, _run_folder(request)))


async def run_json(request: Request) -> JSONResponse:
    folder = _run_folder(request)
    return JSONResponse(runs.detail(_volumes(request).output, folder, started_here=jobs.alive(folder)))


async def run_events(request: Request) -> StreamingResponse:
    """Server-sent events: each new line of the run's event stream from byte `from` on (`event: line`), and its
    summary every few seconds (`event: summary`) — status, ETA — until the browser goes away."""
    folder = _run_folder(request)
    start = request.query_params.get("from", "0") or "0"
    if not start.isdigit():
        raise ValueError(f"from={start!r} is not a byte offset")

    async def stream():
        offset, last_summary = int(start), 0.0
        while not await request.is_disconnected():
            events, offset = runs.tail_events(folder, offset)
            for event in events:
                yield f"event: line\ndata: {json.dumps(event, default=str)}\n\n"
            if time.monotonic() - last_summary > 2.0:
                yield f"event: summary\ndata: {json.dumps(_summary(request, folder).to_dict())}\n\n"
                last_summary = time.monotonic()
            await asyncio.sleep(POLL_SECONDS)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def stop(request: Request) -> JSONResponse:
    return JSONResponse({"stopping": jobs.stop(_run_folder(request))})


async def resume(request: Request) -> JSONResponse:
    return JSONResponse({"started": jobs.resume(_run_folder(request))})


async def new_page(request: Request) -> HTMLResponse:
    panels = {}
    for spec in forms.form_fields():
        panels.setdefault(spec["panel"], []).append(spec)
    return _page(request, "new.html", panels=panels, presets=_presets())


async def _form_settings(request: Request) -> tuple[str, dict, dict]:
    form = await request.json()
    if not isinstance(form, dict) or not all(isinstance(v, str) for v in form.values()):
        return "", {}, {"form": "send the form's fields as strings"}
    return forms.run_settings(form, _volumes(request))


async def preview(request: Request) -> JSONResponse:
    _, settings, errors = await _form_settings(request)
    if errors:
        return JSONResponse({"errors": errors}, 422)
    return JSONResponse({"toml": forms.to_toml(settings)})


def _name_taken(name: str) -> JSONResponse:
    return JSONResponse({"errors": {"run_name": f"{name} already holds a run: pick another name"}}, 409)


async def start(request: Request) -> JSONResponse:
    name, settings, errors = await _form_settings(request)
    if errors:
        return JSONResponse({"errors": errors}, 422)
    folder = _volumes(request).output / name
    if runs.is_run(folder):
        return _name_taken(name)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "run.toml") as tmp:
        tmp.write_text(forms.to_toml(settings), encoding="utf-8")
    jobs.start(folder, ["run", "--config", str(folder / "run.toml")])
    return JSONResponse({"run": name})


async def start_demo(request: Request) -> JSONResponse:
    form = await request.json()
    if not isinstance(form, dict):
        return _refuse(422, "send the form's fields as an object")
    name = str(form.get("run_name") or "demo")
    if not forms.RUN_NAME.match(name):
        return JSONResponse({"errors": {"run_name": "letters, digits, '.', '_' or '-' only"}}, 422)
    folder = _volumes(request).output / name
    if runs.is_run(folder) and _summary(request, folder).status != "stopped":
        return _name_taken(name)
    extra = []
    for key, flag in (("max_train_steps", "--max-train-steps"), ("save_interval", "--save-interval")):
        value = str(form.get(key) or "")
        extra += [flag, value] if value.isdigit() and int(value) > 0 else []
    jobs.start(folder, ["demo", "--output", str(folder), *extra])
    return JSONResponse({"run": name})


async def browse(request: Request) -> JSONResponse:
    volumes, volume = _volumes(request), request.path_params["volume"]
    if volume not in ("models", "data"):
        raise OutsideVolume(volume)
    path = request.query_params.get("path", "")
    entries = listing(volumes.root(volume), path)
    if volume == "data":
        grid = _bucket_grid(request.query_params.get("resolution", "512"))
        for entry in entries:
            if not entry["folder"] and is_photo(entry["name"]):
                image = inside(volumes.data, entry["path"])
                entry["caption"] = _caption(image)
                entry["bucket"] = _bucket(image, *grid)
    return JSONResponse({"volume": volume, "path": path, "entries": entries})


async def model_info(request: Request) -> JSONResponse:
    """What `dreambooth inspect` says about a model file (run as its own process: no model code here)."""
    path = inside(_volumes(request).models, request.query_params.get("path", ""))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "dreambooth", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return JSONResponse({"error": lines[0] if lines else f"inspect failed ({done.returncode})"}, 422)
    try:
        return JSONResponse(json.loads(done.stdout))
    except ValueError:
        return JSONResponse({"error": "inspect printed no JSON"}, 500)


async def save_caption(request: Request) -> JSONResponse:
    form = await request.json()
    if not isinstance(form, dict) or not isinstance(form.get("path"), str) or not isinstance(form.get("caption"), str):
        return _refuse(422, "send {path, caption}")
    image = inside(_volumes(request).data, form["path"])
    if not is_photo(image.name) or not image.is_file():
        return _refuse(422, f"{form['path']} is not an image")
    caption = form["caption"].strip()
    if len(caption) > MAX_CAPTION or "\x00" in caption:
        return _refuse(422, f"a caption is one line of at most {MAX_CAPTION} characters")
    try:
        with atomic_path(image.with_suffix(".txt")) as tmp:  # a reader sees the old caption or the new, never half
            tmp.write_text(caption.replace("\n", " ") + "\n", encoding="utf-8")
    except OSError as exc:  # a read-only /data, or a folder this user may not write
        return _refuse(507, f"could not write the caption of {form['path']} in /data: {exc.strerror or exc}")
    return JSONResponse({"path": form["path"], "caption": _caption(image)})


async def upload_photo(request: Request) -> JSONResponse:
    """One photo (or its `.mask.png`) into a folder of /data, its bytes as the body: `?folder=alice&name=p.jpg`.
    The folder is made when missing; a file already there is never replaced (409); what Pillow cannot read is
    refused (422); nothing is left behind by a refused or failed upload."""
    from PIL import Image, UnidentifiedImageError

    folder_name, name = request.query_params.get("folder", ""), request.query_params.get("name", "")
    if not folder_name or not all(is_plain_name(part) for part in folder_name.split("/")):
        return _refuse(422, f"folder {folder_name!r}: name a folder of /data (e.g. alice); no hidden or '..' parts")
    if not is_plain_name(name) or not (is_photo(name) or is_mask(name)):
        return _refuse(422, f"{name!r}: a photo's file name ends in {', '.join(IMAGE_SUFFIXES)} (or {MASK_SUFFIX})")
    folder = inside(_volumes(request).data, folder_name, must_exist=False)
    if folder.exists() and not folder.is_dir():
        return _refuse(422, f"{folder_name} in /data is a file, not a folder: pick another name")
    body = await request.body()
    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()  # every pixel, as training will read it: a cut JPEG fails here, not at step 0
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return _refuse(422, f"{name}: not an image Pillow can read (PNG, JPEG, WebP, BMP or TIFF)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_new_file(folder / name, body)
    except FileExistsError:
        return _refuse(409, f"{folder_name}/{name} already exists: rename the file, or remove the old one first")
    except OSError as exc:
        return _refuse(507, f"could not write {folder_name}/{name} in /data: {exc.strerror or exc}")
    path = (folder / name).relative_to(_volumes(request).data).as_posix()
    return JSONResponse({"path": path, "name": name, "size": len(body)}, 201)


async def file(request: Request) -> Response:
    volume = request.path_params["volume"]
    if volume not in ("output", "data"):
        raise OutsideVolume(volume)
    path = inside(_volumes(request).root(volume), request.path_params["path"])
    if not path.is_file():
        raise OutsideVolume("not a file")
    download = request.query_params.get("download") == "1"
    return FileResponse(path, filename=path.name if download else None)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _refuse(404, str(exc) if isinstance(exc, OutsideVolume) else "not found")


async def _refused(request: Request, exc: jobs.JobError) -> Response:
    return _refuse(409, str(exc))


async def _bad_request(request: Request, exc: ValueError) -> Response:
    return _refuse(400, f"bad request: {exc}")


ROUTES = [
    Route("/", runs_page),
    Route("/run", run_page),
    Route("/new", new_page),
    Route("/api/runs", runs_json),
    Route("/api/run", run_json),
    Route("/api/run/events", run_events),
    Route("/api/run/stop", stop, methods=["POST"]),
    Route("/api/run/resume", resume, methods=["POST"]),
    Route("/api/new/preview", preview, methods=["POST"]),
    Route("/api/new/start", start, methods=["POST"]),
    Route("/api/demo/start", start_demo, methods=["POST"]),
    Route("/api/browse/{volume}", browse),
    Route("/api/model-info", model_info),
    Route("/api/caption", save_caption, methods=["POST"]),
    Route(UPLOAD, upload_photo, methods=["POST"]),
    Route("/files/{volume}/{path:path}", file),
    Mount("/static", StaticFiles(directory=str(ASSETS / "static")), name="static"),
]


def create_app(volumes: Volumes, *, token: str | None = None) -> Starlette:
    """The page's application over `volumes`; with `token`, every request must carry it."""
    csrf = secrets.token_urlsafe(24)
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(BodyLimit, limit=MAX_BODY, limits={UPLOAD: MAX_PHOTO}),
            Middleware(Guard, token=token, csrf=csrf),
        ],
        exception_handlers={OutsideVolume: _not_found, jobs.JobError: _refused, ValueError: _bad_request},
    )
    app.state.volumes, app.state.csrf = volumes, csrf
    app.state.templates = Jinja2Templates(directory=str(ASSETS / "templates"))
    return app


def _caption(image: Path) -> str | None:
    """The caption training reads (data.read_caption): the first non-empty line of photo.txt, UTF-8."""
    try:
        lines = [line.strip() for line in image.with_suffix(".txt").read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError):
        return None
    return next((line for line in lines if line), None)


def _bucket_grid(resolution: str) -> tuple[list, int]:
    """The buckets `--buckets` makes at this resolution (TrainConfig fills in the sides, as for a run)."""
    from dreambooth.config import Concept, TrainConfig
    from dreambooth.errors import UserError

    try:
        cfg = TrainConfig(
            model=Path("m"), concepts=(Concept("x", Path("x")),), resolution=int(resolution), buckets=True
        )
    except (ValueError, UserError) as exc:
        raise ValueError(f"resolution {resolution!r}: {exc}") from None
    return bucket_grid(cfg.resolution, cfg.bucket_min_side, cfg.bucket_max_side, cfg.bucket_step), cfg.bucket_step


def _bucket(image: Path, grid: list, step: int) -> str | None:
    """The bucket the photo would train in with --buckets ('768x512'); None for a file that is not an image."""
    try:
        return bucket_name(assign_bucket(*image_size(image), grid, step))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _presets() -> list[dict]:
    return [{"name": n, "description": s.get("description", ""), "settings": {k: v for k, v in s.items()
             if k != "description"}} for n, s in forms.presets().items()]  # fmt: skip


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(volumes: Volumes, *, host: str, port: int, token: str | None) -> None:
    """Serve the page until interrupted. Any address but loopback gets a token (generated here when not given)."""
    import uvicorn

    from dreambooth import events

    if token is None and host not in LOOPBACK:
        token = secrets.token_urlsafe(24)
    # every address includes this machine's loopback: the link to open here (a container's port is published there)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host if ":" not in host else f"[{host}]"
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    events.emit("serving", url=url, host=host, port=port)
    print(f"DreamBooth Box: open {url}", flush=True)
    uvicorn.run(create_app(volumes, token=token), host=host, port=port, log_level="warning", access_log=False)
