"""refllm: a from-scratch NumPy reference for Spin's Serverless AI interface."""

__version__ = "0.1.0"
