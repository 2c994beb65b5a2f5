"""Model routes: ``GET /v1/models`` (every served model), ``/v1/models/{name}[/versions/{version}]`` (TF-Serving-style
status that is also KServe's V1 readiness: ``name`` and ``ready``, 503 while not ready) and
``/v1/models/{name}[/versions/{version}]/metadata``; the Open
Inference Protocol's metadata: ``GET /v2`` (server), ``/v2/models/{name}[/versions/{version}]`` (model) and
``.../ready`` (serve/oip.py). Every route of this router requires the API key (router-level dependency); the v2
health probes are open, in operations.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serve.auth import authorize
from serve.oip import EXTENSIONS, VERSION, model_metadata
from serve.protocol import RETRY_AFTER_S
from serve.state import NOT_READY, ServeState, state_of
from transfer import __version__

router = APIRouter(tags=["models"], dependencies=[Depends(authorize)])


def _ready(state: ServeState, name: str, version: str | None = None) -> bool:
    """Whether model ``name`` answers inference now (404 for an unknown model or version once the server is ready;
    while it is starting or stopping, False)."""
    if state.ready or name in state.served:
        state.lookup_version(name, version)
    return state.ready


def _readiness(body: dict, ready: bool) -> dict | JSONResponse:
    """``body`` as is when ready, else a 503 with Retry-After that also carries the error shape."""
    if ready:
        return body
    return JSONResponse({**body, "error": NOT_READY, "type": "not_ready", "status": 503}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


@router.get("/v1/models")
async def list_models(request: Request):
    """Every served model with its classes and input shape."""
    return {"models": [{"name": n, "state": "AVAILABLE", "classes": len(e.model.export.classes),
                        "input_shape": list(e.model.export.input_shape)} for n, e in state_of(request).served.items()]}


@router.get("/v1/models/{name}")
@router.get("/v1/models/{name}/versions/{version}")
async def model_status(name: str, request: Request):
    """TensorFlow-Serving-style model status (every version served, or the one asked for), with KServe V1's
    ``name`` and ``ready`` (503 while not ready)."""
    state = state_of(request)
    version = request.path_params.get("version")
    ready = _ready(state, name, version)
    if version is not None and name in state.served:
        versions = [state.lookup_version(name, version).version]
    else:
        versions = state.version_list(name) or [version or VERSION]
    status = ([{"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
               for v in versions] if ready
              else [{"version": v, "state": "UNLOADING" if name in state.served else "LOADING",
                     "status": {"error_code": "UNAVAILABLE", "error_message": NOT_READY}} for v in versions])
    return _readiness({"name": name, "ready": ready, "model_version_status": status}, ready)


@router.get("/v1/models/{name}/metadata")
@router.get("/v1/models/{name}/versions/{version}/metadata")
async def model_metadata_v1(name: str, request: Request):
    """Classes, input shape and dtype, preprocessing, model sha256, source run and export time."""
    entry = state_of(request).lookup_version(name, request.path_params.get("version"))
    return {**entry.model.metadata(), "version": entry.version}


@router.get("/v2")
async def server_metadata_v2(request: Request):
    """Open Inference Protocol server metadata: name, version and the protocol extensions served."""
    return {"name": request.app.title, "version": __version__, "extensions": list(EXTENSIONS)}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata_v2(name: str, request: Request):
    """Open Inference Protocol model metadata: versions, platform, inputs and outputs with datatypes and shapes."""
    state = state_of(request)
    model = state.lookup_version(name, request.path_params.get("version")).model
    return model_metadata(name, model.api_input, model.export.input_shape, len(model.export.classes),
                          state.version_list(name))


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready_v2(name: str, request: Request):
    """Open Inference Protocol model readiness: 200 when the model answers inference, 503 while not ready."""
    ready = _ready(state_of(request), name, request.path_params.get("version"))
    return _readiness({"name": name, "ready": ready}, ready)
