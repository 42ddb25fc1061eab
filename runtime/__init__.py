"""Torch-free Stable Diffusion runtime: onnxruntime + NumPy."""
