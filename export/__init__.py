"""Export trained runs to SavedModel, TFLite and ONNX, verify parity with the Keras model, and benchmark them.

contract.py   the export directory: file names, manifest keys, sha256, ExportDir (the one reader); no TensorFlow
runtimes.py   one loader per runtime (ONNX Runtime, LiteRT, TensorFlow imported lazily) -> Predictor
formats.py    the format table: one row per format (file, exporter, runtime, special cases as columns)
exporter.py   `transfer export` / `transfer verify`: runs the rows, writes the manifest, verifies
verify.py     parity checks against the Keras model;  bench.py  `transfer bench`;  cli.py  the sub-commands
"""
