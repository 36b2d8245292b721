"""molmoe: a readable PyTorch reference and a Triton fast path for the Molmo VLMs."""
from molmoe.checkpoint import CheckpointError, load
from molmoe.config import MolmoConfig, load_config, preset
from molmoe.errors import MolmoeError, UsageError
from molmoe.model import KVCache, Molmo

__all__ = ["CheckpointError", "KVCache", "Molmo", "MolmoConfig", "MolmoeError", "Processor",
           "UsageError", "load", "load_config", "load_pipeline", "preset"]

# Imported on first use: the processor brings PIL and the tokenizers library, which `import
# molmoe` (the model and the loader alone) does not need.
_LAZY = {"Processor": "molmoe.processing", "load_pipeline": "molmoe.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'molmoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
