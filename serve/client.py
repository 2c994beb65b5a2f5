"""A small HTTP client for `transfer serve` (standard library only)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


class ServeError(Exception):
    """The server answered with an error status (``status``, ``kind`` and ``message`` from its JSON body)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


class ServeClient:
    """Calls the /v1 API of one server: ``ServeClient("http://127.0.0.1:8080", api_key=None)``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 raw: bool = False):
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                err = json.loads(payload)
                raise ServeError(exc.code, err.get("type", "error"), err.get("error", "")) from None
            except (ValueError, AttributeError):
                raise ServeError(exc.code, "error", payload[:200].decode("utf-8", "replace")) from None
        return data if raw else json.loads(data)

    def health(self) -> bool:
        """Whether the server is ready (models loaded and warmed up)."""
        try:
            self._request("GET", "/readyz")
            return True
        except (ServeError, OSError):
            return False

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["models"]

    def metadata(self, name: str) -> dict:
        return self._request("GET", f"/v1/models/{name}/metadata")

    def metrics(self) -> str:
        return self._request("GET", "/metrics", raw=True).decode()

    def classify(self, name: str, images: list[bytes | str | Path] | bytes | str | Path,
                 top_k: int | None = None) -> list[list[dict]]:
        """Top-k ``{"label", "index", "score"}`` per image; images are bytes or file paths."""
        single = not isinstance(images, list)
        blobs = [Path(i).read_bytes() if isinstance(i, str | Path) else i for i in ([images] if single else images)]
        query = f"?top_k={top_k}" if top_k else ""
        if len(blobs) == 1:
            body, content_type = blobs[0], "application/octet-stream"
        else:
            body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in blobs]}).encode()
            content_type = "application/json"
        return self._request("POST", f"/v1/models/{name}:classify{query}", body, content_type)["predictions"]

    def predict(self, name: str, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for float (N, H, W, 3) pixels 0..255 at the model's input size."""
        body = json.dumps({"instances": np.asarray(pixels, np.float32).tolist()}).encode()
        return np.asarray(self._request("POST", f"/v1/models/{name}:predict", body, "application/json")["predictions"],
                          np.float32)
