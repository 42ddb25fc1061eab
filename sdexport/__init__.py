"""Export Stable Diffusion models to ONNX folders tuned per deployment target."""

__version__ = "0.1.0"
