"""Export trained runs to SavedModel, TFLite and ONNX, verify parity with the Keras model, and benchmark them."""
