"""molmoe: a readable PyTorch reference and a Triton fast path for the Molmo VLMs."""
from molmoe.checkpoint import CheckpointError, load
from molmoe.config import MolmoConfig, load_config, preset
from molmoe.errors import MolmoeError, UsageError
from molmoe.model import KVCache, Molmo

__all__ = ["CheckpointError", "KVCache", "Molmo", "MolmoConfig", "load", "load_config", "preset",
           "MolmoeError", "UsageError"]
