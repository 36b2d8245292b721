from molmoe.checkpoint.adapter import CheckpointError, to_native, to_official
from molmoe.checkpoint.loader import load

__all__ = ["CheckpointError", "load", "to_native", "to_official"]
