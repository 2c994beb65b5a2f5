"""Serving exported models over HTTP with ONNX Runtime: app factory, batching engine, decoding, settings, client."""
