"""Generation: batching, sampling and the cached decode loop (outside the model)."""
from molmoe.generation.batching import Batch, left_pad_batch
from molmoe.generation.detok import TextStream, text_stops
from molmoe.generation.engine import (Engine, GenerationConfig, GenerationError,
                                      GenerationLengthError, GenerationResult, Timings,
                                      prompt_allowance)
from molmoe.generation.eos import check_vocabulary, engine_eos, generation_eos_ids, resolve_eos
from molmoe.generation.sampling import MIN_TEMPERATURE, sample_next, top_k_filter, top_p_filter

__all__ = ["Batch", "Engine", "GenerationConfig", "GenerationError", "GenerationLengthError",
           "GenerationResult", "MIN_TEMPERATURE", "Timings", "check_vocabulary", "engine_eos",
           "generation_eos_ids", "left_pad_batch",
           "prompt_allowance", "resolve_eos", "sample_next", "text_stops", "TextStream",
           "top_k_filter", "top_p_filter"]
