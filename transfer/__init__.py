"""Transfer learning, scratch baselines and comparison for image classification on TensorFlow/Keras."""

__version__ = "0.1.0"
