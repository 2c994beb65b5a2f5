"""Serving exported models over HTTP with ONNX Runtime (app factory, routers, auth, batching engine, decoding,
settings, client) and `transfer predict`; export directories and runtimes come from export.contract and
export.runtimes. No TensorFlow. docs/serve.md has the module layout."""
