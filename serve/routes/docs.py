"""API documentation routes: ``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``. They require the API key when
the server has one (router-level dependency), like every /v1 route: the schema tells whoever reads it what the server
serves. With a key, fetch the schema with the bearer token (``curl -H "Authorization: Bearer KEY" .../openapi.json``);
the browser pages are for servers without a key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse

from serve.auth import authorize

router = APIRouter(tags=["docs"], dependencies=[Depends(authorize)])
OPENAPI_URL = "/openapi.json"


@router.get(OPENAPI_URL, include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI schema of the service."""
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def swagger(request: Request):
    """Swagger UI over the schema."""
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - Swagger UI")


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request):
    """ReDoc over the schema."""
    return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - ReDoc")
