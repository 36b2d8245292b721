"""Turning a prompt and an image into model inputs, exactly as the released Molmo processor does.

images.py     any image -> RGB uint8 (modes, EXIF, transparency, size limits)
preprocess.py resize / tiling / patches / masks / token layout (spec §4)
tokenizer.py  the checkpoint's tokenizer and Molmo's special ids (spec §5.1)
processor.py  `Processor`: text + image -> input_ids, images, image_masks, image_input_idx
"""
from molmoe.processing.images import DEFAULT_MAX_PIXELS, ImageError, LoadedImage, load_image
from molmoe.processing.preprocess import ImageSettings, select_tiling
from molmoe.processing.processor import Processor, PromptTooLongError, prompt_text
from molmoe.processing.tokenizer import IMAGE_TOKENS, Tokenizer, TokenizerError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_TOKENS", "ImageError", "ImageSettings", "LoadedImage",
           "Processor", "PromptTooLongError", "Tokenizer", "TokenizerError", "load_image",
           "prompt_text", "select_tiling"]
