"""No client input is a 5xx: every route of the app, swept with JSON of the wrong types where objects, lists, strings
and numbers belong (the v2 input "name" a list or an object, ...) and with 5,000-digit numbers (past Python's
4,300-digit int() limit) in the body, the query (``top_k``) and the headers (``Inference-Header-Content-Length``),
is answered below 500."""

from __future__ import annotations

import itertools
import json

import pytest
from starlette.routing import Route

from serve.app import create_app
from serve.settings import Settings

fastapi_testclient = pytest.importorskip("fastapi.testclient")

HUGE = "9" * 5000  # a number no int() takes from text
WRONG = [None, True, -1, 1.5, "x", [], {}, [1], {"a": 1}, [[1]], [{}], float("inf")]


def _bodies(model_input: str) -> list[bytes]:
    """Bodies with a wrong type (or a 5,000-digit number) in each place the /v1 and /v2 parsers look."""
    tensor = {"name": model_input + "_bytes", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}
    docs = [*WRONG, {"instances": None}]
    for key, value in itertools.product(("instances", "inputs", "outputs", "parameters", "id"), WRONG):
        docs.append({key: value})
        docs.append({"inputs": [tensor], key: value})
    for key, value in itertools.product(("name", "datatype", "shape", "data", "parameters"), WRONG):
        docs.append({"inputs": [{**tensor, key: value}]})
        docs.append({"inputs": [{**tensor, "parameters": {"binary_data_size": value}}]})
        docs.append({"inputs": [tensor], "outputs": [{"name": "probabilities", key: value}]})
        docs.append({"inputs": [tensor], "outputs": [{"name": "probabilities",
                                                      "parameters": {"classification": value}}]})
        docs.append({"instances": [{key: value}]})
        docs.append({"instances": [{"b64": value}]})
        docs.append({"instances": [{"image": {"b64": value}}]})
    docs.append({"inputs": [{**tensor, "shape": [int(HUGE[:300])]}]})
    texts = [json.dumps(d).encode() for d in docs]
    huge = HUGE.encode()  # 5,000-digit numbers (json.dumps cannot write them)
    texts += [b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [' + huge + b", 1, 1, 3]}]}",
              b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": '
              b'{"binary_data_size": ' + huge + b"}}]}",
              b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}], '
              b'"outputs": [{"name": "probabilities", "parameters": {"classification": ' + huge + b"}}]}",
              b'{"instances": [[' + huge + b"]]}", huge]
    return texts


def _paths(app, name: str) -> list[tuple[str, str]]:
    found = []
    for route in app.routes:
        if isinstance(route, Route):
            path = route.path.replace("{name}", name).replace("{version}", "1")
            found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
            found += [(method, route.path.replace("{name}", HUGE[:100]).replace("{version}", HUGE))
                      for method in sorted(route.methods or ()) if "{" in route.path and method != "HEAD"]
    return found


def test_no_route_answers_wrong_json_types_or_huge_numbers_with_a_5xx(export_dir):
    app = create_app(Settings(export_dirs=(str(export_dir),)))
    with fastapi_testclient.TestClient(app, raise_server_exceptions=False) as client:
        name = export_dir.name
        bodies = _bodies("image")
        queries = ["", f"?top_k={HUGE}", "?top_k=-1", "?top_k=x", "?top_k=1.5", "?top_k=", f"?top_k={HUGE[:19]}"]
        headers = [{}, {"Inference-Header-Content-Length": HUGE}, {"Inference-Header-Content-Length": "-3"},
                   {"Inference-Header-Content-Length": HUGE[:19]}, {"Inference-Header-Content-Length": "x"}]
        failures = []
        for method, path in _paths(app, name):
            if method == "GET":
                cases = [(q, {}, None) for q in queries]
            elif HUGE in path:
                cases = [("", {"Content-Type": "application/json"}, bodies[0])]
            else:
                cases = [("", {"Content-Type": "application/json"}, b) for b in bodies]
                cases += [("", {"Content-Type": ctype, **h}, b'{"inputs": []}' + bytes(8)) for h in headers
                          for ctype in ("application/json", "application/octet-stream")]
                cases += [(q, {"Content-Type": ctype}, body) for q in queries
                          for ctype, body in (("image/png", b"\x89PNG"), ("application/json", bodies[-1]))]
            for query, head, body in cases:
                response = client.request(method, path + query, headers=head, content=body)
                if response.status_code >= 500:
                    failures.append((method, path[:80], query[:30], (body or b"")[:100], response.status_code,
                                     response.text[:200]))
        assert not failures, f"{len(failures)} 5xx, first: {failures[:5]}"
