"""Inference: the :class:`Predictor` (a model with its preprocessing and names), the ONNX Runtime
backend for exported models, and ``cnnkit predict``'s streaming writers."""
