"""Model routes: ``GET /v1/models`` (every served model), ``/v1/models/{name}`` (TF-Serving-style status) and
``/v1/models/{name}/metadata``. Every route of this router requires the API key (router-level dependency)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from serve.auth import authorize
from serve.state import state_of

router = APIRouter(tags=["models"], dependencies=[Depends(authorize)])


@router.get("/v1/models")
async def list_models(request: Request):
    """Every served model with its classes and input shape."""
    return {"models": [{"name": n, "state": "AVAILABLE", "classes": len(e.model.export.classes),
                        "input_shape": list(e.model.export.input_shape)} for n, e in state_of(request).served.items()]}


@router.get("/v1/models/{name}")
async def model_status(name: str, request: Request):
    """TensorFlow-Serving-style model status."""
    state_of(request).lookup(name)
    return {"name": name, "model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


@router.get("/v1/models/{name}/metadata")
async def model_metadata(name: str, request: Request):
    """Classes, input shape and dtype, preprocessing, model sha256, source run and export time."""
    return state_of(request).lookup(name).model.metadata()
