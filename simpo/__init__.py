"""simpo: pure-PyTorch SimPO / DPO preference optimisation for decoder LLMs."""

__version__ = "0.1.0"
