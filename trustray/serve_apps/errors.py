"""OpenAI-shaped errors for every FastAPI app of trustray: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trustray.serve_apps.schemas import APIError


def install_error_handlers(app: FastAPI) -> None:
    """`APIError` as its own status; schema errors as 400 naming the first bad field (OpenAI answers them with 400,
    not FastAPI's 422); HTTP errors (404, 405...) in the same shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        # 503: a replica is being replaced; clients (the openai one included) retry after this.
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in item.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{item.get('msg')}" for item in problems)
        return JSONResponse(APIError(400, message or "invalid request", param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return JSONResponse(APIError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)
