from molmoe.model.kv_cache import KVCache
from molmoe.model.molmo import Molmo

__all__ = ["Molmo", "KVCache"]
