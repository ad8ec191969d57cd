"""Every error the server answers, in OpenAI's format (kdlm.serve.guard.error_body), never a crash."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdlm.serve.flow import ApiError, ClientGone
from kdlm.serve.guard import BodyTooLarge, error_body


async def api_error(request: Request, error: ApiError) -> Response:
    body = error_body(error.status, error.message, error.code, error.param)
    return JSONResponse(body, error.status, headers=error.headers)


async def client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": no one reads it


async def invalid_request(request: Request, error: RequestValidationError) -> Response:
    """A body that does not fit the request schema: every problem in one line, the first one's field as `param`."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
        problems.append(f"{where}: {item['msg']}")
    param = ".".join(str(part) for part in error.errors()[0]["loc"] if part != "body") if error.errors() else None
    return JSONResponse(error_body(400, "invalid request: " + "; ".join(problems), "invalid_request", param), 400)


async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    if isinstance(error, BodyTooLarge):  # close: the rest of the body is never read
        return JSONResponse(error_body(413, str(error.detail), "request_too_large"), 413,
                            headers={"connection": "close"})
    return JSONResponse(error_body(error.status_code, str(error.detail), "http_error"), error.status_code)


async def bug(request: Request, error: Exception) -> Response:
    return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}", "server_error"), 500)


def handle_errors(app: FastAPI) -> None:
    for kind, handler in ((ApiError, api_error), (ClientGone, client_gone), (RequestValidationError, invalid_request),
                          (StarletteHTTPException, http_error), (Exception, bug)):
        app.add_exception_handler(kind, handler)
