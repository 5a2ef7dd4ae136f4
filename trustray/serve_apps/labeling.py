"""The labeling service: people label preference pairs in a web page or through an API, on Ray Serve.

    trustray label --config configs/labeling/local.yaml [key=value ...]

A Serve application of its own under the route prefix `/v1/labels`, so it runs next to the OpenAI app on the same
HTTP proxy (Serve routes by the longest prefix):
- `GET  /v1/labels/`       the page: the prompt, the two responses in a per-labeler random order, buttons and
                           keyboard shortcuts (1 / 2 / 3 / 4 or A / B / T / S: first, second, tie, skip);
- `GET  /v1/labels/next`   the next pair to label (`{"item": null}` when none is waiting);
- `POST /v1/labels`        `{"item_id", "choice": "first"|"second"|"tie"|"skip", "idempotency_key"}`: stored once;
                           the same request again is answered the same way (`"duplicate": true`);
- `POST /v1/labels/items`  (admin) add pairs: `{"items": [{"id", "prompt", "a", "b", ...}]}`;
- `GET  /v1/labels/export` (admin) every preference as TRL JSONL; `GET /v1/labels/stats` counts.
Every route but the page needs `Authorization: Bearer <key>`: a labeler's key (named in `labelers`) or the
admin key; 401 without one. Labels live in SQLite (`trustray.data.label_store`: WAL, one transaction per write),
so a restart or a crash of the service loses nothing; the preference loop reads the same file.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import Field, model_validator
from ray import serve

from trustray.config import BaseConfig
from trustray.data.label_store import CHOICES, LabelConflict, LabelStore, UnknownItem
from trustray.serve_apps.api_docs import DocumentedAPI
from trustray.serve_apps.config import DeploymentOptions
from trustray.serve_apps.errors import install_error_handlers
from trustray.serve_apps.schemas import APIError, ValidUnicode

logger = logging.getLogger(__name__)

APP_NAME = "trustray-labels"
ROUTE_PREFIX = "/v1/labels"


class LabelingConfig(BaseConfig):
    """The labeling service: where labels are kept and who may label."""

    host: str = Field("127.0.0.1", description="Address the Serve HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy.")
    db: str = Field("outputs/labels/labels.sqlite", description="The SQLite file (shared storage on a cluster).")
    labelers: dict[str, str] = Field(default_factory=dict, description="Labeler name -> API key. Keep keys out of "
                                     "version control: put them in a config file of your own or in labelers_env.")
    labelers_env: str | None = Field("TRUSTRAY_LABELER_KEYS", description="Environment variable with more labelers "
                                     "as `name:key,name:key` (read when the service starts).")
    admin_key: str | None = Field(None, description="Key that may add items and export (None: nobody may).")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="The Serve deployment.")

    def resolved_labelers(self) -> dict[str, str]:
        """Labeler name -> key, the config's and the environment's; at least one, keys distinct."""
        labelers = dict(self.labelers)
        raw = os.environ.get(self.labelers_env, "") if self.labelers_env else ""
        for entry in filter(None, (part.strip() for part in raw.split(","))):
            name, _, key = entry.partition(":")
            if not name or not key:
                raise ValueError(f"{self.labelers_env} entries are name:key, got {entry!r}")
            labelers[name] = key
        if not labelers:
            raise ValueError("the labeling service needs at least one labeler: set labelers or "
                             f"${self.labelers_env}")
        keys = list(labelers.values()) + ([self.admin_key] if self.admin_key else [])
        if len(set(keys)) != len(keys) or any(len(key) < 8 for key in keys):
            raise ValueError("labeler and admin keys must be distinct and at least 8 characters long")
        return labelers


class LabelRequest(ValidUnicode):
    item_id: str = Field(min_length=1, description="The item shown by GET /v1/labels/next.")
    choice: str = Field(description=f"One of {', '.join(CHOICES)} (in the order the responses were shown).")
    idempotency_key: str = Field(min_length=8, max_length=200, description="Unique per label; resending the same "
                                 "request with the same key stores it once.")

    @model_validator(mode="after")
    def _known_choice(self) -> LabelRequest:
        if self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}")
        return self


class ItemsRequest(ValidUnicode):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=10_000, description="Pairs to label.")


class _PrefixIsRoot:
    """Routes the bare prefix (`POST /v1/labels`, which Serve hands over as an empty path under the prefix) to `/`,
    where Starlette would answer it with a redirect that a POST's client may not follow."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == scope.get("root_path", "").rstrip("/"):
            scope = {**scope, "path": scope.get("root_path", "").rstrip("/") + "/"}
        await self.app(scope, receive, send)


app = DocumentedAPI(title="trustray labeling", description="Preference labels from people.")
app.add_middleware(_PrefixIsRoot)
install_error_handlers(app)


PAGE = (Path(__file__).with_name("labeling.html")).read_text()


@serve.deployment
@serve.ingress(app)
class LabelingService:
    def __init__(self, config: dict[str, Any]):
        self.config = LabelingConfig.model_validate(config)
        self.labelers = self.config.resolved_labelers()
        self.store = LabelStore(self.config.db)

    def _caller(self, request: Request, admin: bool = False) -> str:
        """The labeler the request's key belongs to ("admin" for the admin key); 401 otherwise."""
        given = request.headers.get("authorization", "").encode()
        if self.config.admin_key and hmac.compare_digest(given, f"Bearer {self.config.admin_key}".encode()):
            return "admin"
        if not admin:
            for name, key in self.labelers.items():
                if hmac.compare_digest(given, f"Bearer {key}".encode()):
                    return name
        raise APIError(401, f"a valid {'admin ' if admin else ''}API key is required: send 'Authorization: Bearer "
                       "<key>'", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/next")
    async def next_item(self, request: Request) -> dict[str, Any]:
        shown = self.store.next_item(self._caller(request))
        if shown is None:
            return {"item": None, **self.store.counts()}
        return {"item": {"id": shown.item_id, "prompt": shown.prompt, "responses": [shown.first, shown.second]},
                **self.store.counts()}

    @app.post("/")
    async def submit(self, body: LabelRequest, request: Request) -> dict[str, Any]:
        labeler = self._caller(request)
        try:
            label, stored = self.store.submit(body.item_id, labeler, body.choice, body.idempotency_key)
        except UnknownItem:
            raise APIError(404, f"no item {body.item_id!r}", param="item_id", code="not_found") from None
        except LabelConflict as conflict:
            raise APIError(409, str(conflict), param="idempotency_key", code="conflict") from None
        return {"item_id": body.item_id, "labeler": labeler, "label": label, "duplicate": not stored}

    @app.post("/items")
    async def add_items(self, body: ItemsRequest, request: Request) -> dict[str, int]:
        self._caller(request, admin=True)
        try:
            return {"added": self.store.add_items(body.items)}
        except ValueError as error:
            raise APIError(400, str(error), param="items") from None

    @app.get("/export")
    async def export(self, request: Request) -> PlainTextResponse:
        import json

        self._caller(request, admin=True)
        rows = self.store.export_rows()
        return PlainTextResponse("".join(json.dumps(row) + "\n" for row in rows), media_type="application/x-ndjson")

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, int]:
        self._caller(request)
        return self.store.counts()


def build_app(config: LabelingConfig) -> serve.Application:
    config.resolved_labelers()  # refuse a config without labelers here, not in a replica's retries
    db = str(Path(config.db).expanduser().resolve())
    return LabelingService.options(**config.deployment.serve_options()).bind(
        config.model_copy(update={"db": db}).model_dump())


def run_app(config: LabelingConfig) -> str:
    """Start Ray and Serve's proxy if needed, deploy the service and return the page's URL."""
    from trustray.actors.cluster import init_ray

    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{config.port}{ROUTE_PREFIX}/"
    logger.info("labeling page at %s", url)
    return url


def shutdown() -> None:
    """Delete the service; stop Serve too when no other application runs on it (the OpenAI app may)."""
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
