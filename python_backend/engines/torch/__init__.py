"""The PyTorch engine (Llama-family native forward, Triton kernels, CUDA graphs)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
