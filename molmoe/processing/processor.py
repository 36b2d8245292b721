"""`Processor`: prompt text + optional image -> the model inputs of the released `process()`.

Layout (spec §4.6): [BOS] <image tokens> " User: {text} Assistant:". The text is tokenised without
special tokens, the image tokens come before all text, BOS (= EOS for all Molmo tokenizers) is
prepended and every non-negative `image_input_idx` is shifted by one for it.

Outputs, no batch dimension, as the released processor returns them:
  input_ids [S] int64; with an image also images [T, 576, 588] float32, image_masks [T, 576]
  float32, image_input_idx [T, 144] int32 and original_size (W, H) (after EXIF rotation).

`compat` (molmoe.compat): "molmoe", the default, is the corrected behaviour: user text is encoded
as plain text, so it cannot name a special token (`Tokenizer.encode_text`), and images get EXIF
rotation and alpha compositing. "released" reproduces the released processor bit for bit, for
reproducing published numbers: its flaws included, so "<im_patch>" typed in the prompt IS the
image-patch id there, EXIF is not applied and alpha is dropped by convert("RGB"). The model has the
matching switch for its crop-validity rule (`Molmo.set_compat`).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import torch

from molmoe.compat import check_compat
from molmoe.config import ConfigError, load_config
from molmoe.errors import MolmoeError, UsageError
from molmoe.fileio import read_json
from molmoe.processing import native
from molmoe.processing.images import DEFAULT_MAX_PIXELS, ImageInput, LoadedImage, load_image
from molmoe.processing.preprocess import (ImageSettings, ImageTokenIds, canvas_size,
                                          image_layout, n_image_tokens, preprocess_image,
                                          scaled_size)
from molmoe.processing.tokenizer import Tokenizer


class PromptTooLongError(MolmoeError):
    """The prompt (image tokens included) does not fit the model's context."""

    def __init__(self, needed: int, image_tokens: int, allowed: int, note: str | None = None):
        self.needed, self.image_tokens, self.allowed = needed, image_tokens, allowed
        super().__init__(f"prompt needs {needed} tokens ({image_tokens} image tokens), "
                         f"the model allows {allowed}" + (f" ({note})" if note else ""))


def image_settings(directory) -> ImageSettings:
    """The checkpoint directory's preprocessor_config.json (the released defaults without one)."""
    pre = pathlib.Path(directory) / "preprocessor_config.json"
    if not pre.exists():
        return ImageSettings()
    return ImageSettings.from_config(read_json(pre, ConfigError), source=str(pre))


def decode_target(settings: ImageSettings, size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) the largest resize of an image of displayed size (W, H) goes to: the tile canvas's
    resized image (the global view is smaller). A fast decode needs no more pixels than this."""
    width, height = size
    canvas = canvas_size(image_layout(height, width, settings), settings)
    new_h, new_w = scaled_size(height, width, *canvas)
    return new_w, new_h


def prompt_text(text: str) -> str:
    """The single-turn prompt of the released processor ("role" format, leading space)."""
    return " User: " + text + " Assistant:"


class Processor:
    def __init__(self, tokenizer: Tokenizer, settings: ImageSettings | None = None, *,
                 max_positions: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 device: torch.device | str | None = None, compat: str = "molmoe",
                 preprocess: str | None = None, fast_decode: bool = False):
        """max_positions: the model's position limit (config max_position_embeddings).
        device: where the pixel work runs (None = CPU; a CUDA device returns images and
        image_masks on it).
        compat: "molmoe" (corrected, default) or "released" (module docstring).
        preprocess: "native" (the csrc op: within 1e-6 of the released arithmetic, ~10x faster),
        "python" (the released arithmetic bit for bit) or "auto" (native when built, else python
        with a one-time warning). Default: "auto", but "python" under compat="released", which
        promises bit-for-bit output.
        fast_decode: opt-in, NOT bit-exact: JPEGs at least 2x larger than the tile canvas are
        decoded at reduced DCT scale (PIL draft mode; `load_image`). Measured error and answer
        changes: docs/preprocessing.md."""
        self.compat = check_compat(compat)
        if preprocess is None:
            preprocess = "python" if self.compat == "released" else None
        elif preprocess not in native.BACKENDS:
            raise UsageError(f"preprocess={preprocess!r} is not one of "
                             f"{', '.join(native.BACKENDS)}")
        self.preprocess = preprocess
        self.fast_decode = bool(fast_decode)
        self.tokenizer = tokenizer
        self.settings = settings or ImageSettings()
        self.max_positions = max_positions
        self.max_pixels = max_pixels
        self.device = device
        self.token_ids = ImageTokenIds(start=tokenizer.image_start_id, end=tokenizer.image_end_id,
                                       patch=tokenizer.image_patch_id, col=tokenizer.image_col_id)

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str | os.PathLike, **kwargs) -> "Processor":
        """A local checkpoint dir or a hub id (through huggingface_hub's cache)."""
        from molmoe.checkpoint.files import resolve

        d = resolve(model_id_or_dir)
        settings = image_settings(d)
        pre = d / "preprocessor_config.json"
        max_positions = None
        if (d / "config.json").exists():  # where the processor meets the model's config
            config = load_config(d / "config.json")
            settings.check_against(config.vision, source=str(pre))
            max_positions = config.text.max_position_embeddings
        kwargs.setdefault("max_positions", max_positions)
        return cls(Tokenizer.from_dir(d), settings, **kwargs)

    def decode_target(self, size: tuple[int, int]) -> tuple[int, int]:
        """`decode_target` for this processor's settings."""
        return decode_target(self.settings, size)

    def load(self, image: ImageInput) -> LoadedImage:
        """The image as this processor reads it (limits, compat, fast decode when enabled)."""
        if isinstance(image, LoadedImage):
            return image
        return load_image(image, max_pixels=self.max_pixels, compat=self.compat,
                          fast_decode=self.decode_target if self.fast_decode else None)

    def image_token_count(self, width: int, height: int) -> int:
        """How many prompt tokens an image of this size takes (no pixels touched)."""
        return n_image_tokens(image_layout(height, width, self.settings), self.settings)

    def __call__(self, text: str, images: ImageInput | LoadedImage | list | tuple | None = None,
                 max_length: int | None = None) -> dict:
        """max_length: refuse prompts longer than this (default: the model's position limit).
        Leave room for the answer: pass the limit minus max_new_tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(images, (list, tuple)) and not isinstance(images, LoadedImage):
            if len(images) > 1:
                # The released code maps every later image onto the first one's positions (§4.6).
                raise UsageError(f"got {len(images)} images; Molmo 0924 supports one image per "
                                 "prompt")
            images = images[0] if images else None
        limit = max_length if max_length is not None else self.max_positions
        encode = self.tokenizer.encode if self.compat == "released" else self.tokenizer.encode_text
        text_ids = np.array(encode(prompt_text(text)), dtype=np.int64)
        bos = np.array([self.tokenizer.bos_token_id], dtype=np.int64)

        if images is None:
            self._check_length(1 + len(text_ids), 0, limit)
            return {"input_ids": torch.from_numpy(np.concatenate([bos, text_ids]))}

        pixels, original_size = self.load(images)
        # Refuse before the pixel work: the token count depends on the size only.
        n_img = self.image_token_count(*original_size)
        self._check_length(1 + n_img + len(text_ids), n_img, limit)

        inputs = preprocess_image(pixels, self.settings, self.token_ids, self.device,
                                  backend=self.preprocess,
                                  size=(original_size[1], original_size[0]))
        assert len(inputs.tokens) == n_img
        idx_TK = np.where(inputs.image_input_idx < 0, inputs.image_input_idx,
                          inputs.image_input_idx + 1).astype(np.int32)  # +1 for the BOS
        out = {
            "input_ids": torch.from_numpy(np.concatenate([bos, inputs.tokens, text_ids])),
            "images": inputs.images,
            "image_input_idx": torch.from_numpy(idx_TK),
        }
        if self.settings.image_padding_mask:
            out["image_masks"] = inputs.image_masks
        out["original_size"] = original_size
        return out


    @staticmethod
    def _check_length(needed: int, n_image: int, limit: int | None) -> None:
        if limit is not None and needed > limit:
            raise PromptTooLongError(needed, n_image, limit)
