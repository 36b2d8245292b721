"""Image -> crops, patches, padding masks and token layout, as the released Molmo processor does.

Reproduces `image_preprocessing_molmo.py` of the 0924 checkpoints (current revision, torch bilinear
resize; spec §4.0-§4.5) bit for bit on CPU:
  * scale arithmetic in float32 with int() truncation (§4.2; float64 differs for ~3 % of sizes),
  * bilinear + antialias resize of float32 [0, 1] CHW pixels, then clamp (what torchvision's
    `Resize(BILINEAR, antialias=True)` does on a float tensor), centered zero padding,
  * CLIP normalisation as subtract-then-divide in float32,
  * tiling choice with the first-argmax / first-argmin tie rules (§4.3),
  * a global 336x336 view first, then the overlapping tiles of a canvas (§4.4),
  * `image_masks` with the legacy off-by-one: tile masks shifted by one crop and a trailing -1 row
    (§4.5; the 0924 models were trained with it, so it is part of the model).

Shape legend: H, W image height/width; T crops (1 global + th*tw tiles); P patches per crop (576);
Dp pixels per patch (14*14*3 = 588); K pooled tokens per crop (12*12 = 144); C channels (3).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from molmoe.config import MAX_PATCHES_PER_CROP, ConfigError, VisionConfig
from molmoe.errors import UsageError, is_int
from molmoe.processing import native

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Caps on preprocessor_config.json values (the released files have max_crops 12).
# 256 crops take 256 * 144 = 36864 image tokens, more than the largest released position limit
# (32768, MolmoE), so a larger max_crops can never yield a prompt the model accepts; the crops of
# 256 tiles are 256 * 576 * 588 float32 = 0.35 GB.
MAX_CROPS = 256
# image_mean / image_std sanity range. Pixels are scaled to [0, 1] before normalisation (CLIP's
# mean ~0.45, std ~0.27): a std below 1e-4 or above 1e4, or a mean beyond +-1e4, is a file meant
# for another pixel scale or a corrupt one, and answers with a blown-up or flattened image
# (image_std 1e308 turned every pixel into exactly 0.0 in float32).
NORM_MIN_STD, NORM_MAX = 1e-4, 1e4


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """The values of `preprocessor_config.json` (identical for all four 0924 models).

    Validated on construction (ConfigError naming the key and value); `from_config` adds the file
    name, `check_against` checks the settings against the model's ViT.
    """

    base_image_input_size: tuple[int, int] = (336, 336)
    image_patch_size: int = 14
    image_token_length_h: int = 12
    image_token_length_w: int = 12
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_normalize: bool = True
    image_padding_mask: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        ints = lambda name, n: _int_tuple(getattr(self, name), name, n)  # noqa: E731
        crop_h, crop_w = ints("base_image_input_size", 2)
        (p,) = ints("image_patch_size", 1)
        (kh,), (kw,) = ints("image_token_length_h", 1), ints("image_token_length_w", 1)
        (max_crops,) = ints("max_crops", 1)
        left, right = ints("overlap_margins", 2)
        for name in ("image_mean", "image_std"):
            _float_tuple(getattr(self, name), name)
        for name in ("do_normalize", "image_padding_mask"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "must be true or false")
        if p < 1:
            _bad("image_patch_size", p, "must be >= 1")
        side = crop_h // p
        if crop_h != crop_w or crop_h < 1 or crop_h % p or side % 2 or \
                side * side > MAX_PATCHES_PER_CROP:
            _bad("base_image_input_size", list(self.base_image_input_size),
                 f"must be square and an even multiple of image_patch_size {p} (2x2 pooling), "
                 f"at most {MAX_PATCHES_PER_CROP} patches")
        for key, value in (("image_token_length_h", kh), ("image_token_length_w", kw)):
            if value != side // 2:
                _bad(key, value, f"must be {side // 2}: 2x2 pooling of {side} patches per side")
        if left < 0 or right < 0 or left % 2 or right % 2 or left + right >= side:
            _bad("overlap_margins", list(self.overlap_margins),
                 "must be even, >= 0 and leave part of each crop")
        if not 1 <= max_crops <= MAX_CROPS:
            _bad("max_crops", max_crops, f"must be in 1..{MAX_CROPS} (MAX_CROPS)")
        if not all(NORM_MIN_STD <= s <= NORM_MAX for s in self.image_std):
            _bad("image_std", list(self.image_std),
                 f"must be in {NORM_MIN_STD}..{NORM_MAX:g} (normalisation divides [0, 1] pixels "
                 "by it: 0 divides by zero, a huge std flattens the image to 0 in float32)")
        if not all(abs(m) <= NORM_MAX for m in self.image_mean):
            _bad("image_mean", list(self.image_mean), f"must be within +-{NORM_MAX:g} (pixels are "
                 "in [0, 1] before it is subtracted)")

    @classmethod
    def from_config(cls, cfg: dict, *,
                    source: str = "preprocessor_config.json") -> "ImageSettings":
        """From a parsed preprocessor_config.json; unknown keys (auto_map, class names) ignored."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: must be a JSON object, got {type(cfg).__name__}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in cfg and cfg[f.name] is not None:
                v = cfg[f.name]
                kw[f.name] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def check_against(self, vision: VisionConfig, *,
                      source: str = "preprocessor_config.json") -> None:
        """Refuse settings whose crops the model's ViT cannot take (config.json's vision)."""
        pairs = (("base_image_input_size", self.crop_size, "image_size", vision.image_size),
                 ("image_patch_size", self.image_patch_size, "patch_size", vision.patch_size),
                 ("image_token_length_h * _w", self.tokens_per_crop, "tokens per crop",
                  vision.tokens_per_crop))
        for key, ours, theirs, value in pairs:
            if ours != value:
                raise ConfigError(f"{source}: {key} gives {ours}, but the model's ViT has "
                                  f"{theirs} {value} (config.json)")

    # Derived constants (spec §4.1).
    @property
    def crop_size(self) -> int:                 # 336
        return self.base_image_input_size[0]

    @property
    def crop_patches(self) -> int:              # 24
        return self.crop_size // self.image_patch_size

    @property
    def margin_pixels(self) -> int:             # 112 = 14 * (4 + 4)
        return self.image_patch_size * sum(self.overlap_margins)

    @property
    def window_patches(self) -> int:            # 16 usable patches per tile side
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def window_size(self) -> int:               # 224 px stride between tiles
        return self.window_patches * self.image_patch_size

    @property
    def tokens_per_crop(self) -> int:           # 144
        return self.image_token_length_h * self.image_token_length_w


def _bad(key: str, value, problem: str):
    raise ConfigError(f"{key} = {value!r} {problem}")


def _int_tuple(value, key: str, n: int) -> tuple[int, ...]:
    """`value` as n ints (n == 1: a bare int), else ConfigError naming the key."""
    items = (value,) if n == 1 else value
    if not isinstance(items, tuple) or len(items) != n or \
            not all(map(is_int, items)):
        _bad(key, value, "must be an integer" if n == 1 else f"must be {n} integers")
    return items


def _float_tuple(value, key: str) -> None:
    if not isinstance(value, tuple) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        _bad(key, value, "must be 3 finite numbers (R, G, B)")


def _f32(x) -> np.float32:
    return np.float32(x)


def scaled_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Aspect-preserving size that fits (target_h, target_w), float32 math + truncation (§4.2).

    Clamped to at least 1 px: the released code crashes on a 0-px side (e.g. 1x5000 images);
    molmoe keeps such slivers as a 1-px line instead.
    """
    scale = min(_f32(target_h) / _f32(height), _f32(target_w) / _f32(width))
    return max(1, int(_f32(height) * scale)), max(1, int(_f32(width) * scale))


def _as_tensor(image_HWC: np.ndarray) -> torch.Tensor:
    """A tensor view of the array; a copy when it is read-only (torch refuses to view read-only
    arrays, e.g. PIL's)."""
    return torch.from_numpy(image_HWC if image_HWC.flags.writeable else image_HWC.copy())


def _resize_channels(image_HWC: np.ndarray, new_h: int, new_w: int,
                     device: torch.device | str | None) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, new_h, new_w] in [0, 1], on the CPU: to float, / 255,
    bilinear antialiased resize, clamp, as torchvision's Resize on the float tensor.

    One channel at a time: the resize treats channels independently (same weights, same order of
    accumulation), so the result is bit-identical to resizing all three at once, while the
    full-size float copy is 4 bytes per pixel instead of 3 x 4 (x 2 with the division's
    temporary). On a large image that copy is the processor's peak memory: about 7 bytes per
    input pixel with the uint8 input, where resizing [3, H, W] at once took about 30 (issue 10).
    """
    height, width = image_HWC.shape[:2]
    src_HWC = _as_tensor(image_HWC)
    out_CHW = torch.empty(3, new_h, new_w, dtype=torch.float32)
    for c in range(3):
        x_HW = src_HWC[:, :, c]
        if device is not None:
            x_HW = x_HW.to(device)
        x_HW = x_HW.float().div_(255.0)
        if (new_h, new_w) != (height, width):  # torchvision's Resize returns it unchanged here
            x_HW = F.interpolate(x_HW[None, None], size=(new_h, new_w), mode="bilinear",
                                 align_corners=False, antialias=True)[0, 0]
        out_CHW[c] = x_HW.clamp_(0.0, 1.0)
        del x_HW
    return out_CHW


def resize_and_pad(image_HWC: np.ndarray, target: tuple[int, int], settings: ImageSettings,
                   device: torch.device | str | None = None, *,
                   size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [H, W, 3] -> (normalised float32 [TH, TW, 3], bool pixel mask [TH, TW]) on CPU.

    `device` may name a CUDA device to run the resize there; the CPU result is the reference.
    `size`: the picture's (H, W) when the pixels are a reduced (fast) decode of it; the resized
    size is the full picture's.
    """
    target_h, target_w = target
    height, width = size or image_HWC.shape[:2]
    new_h, new_w = scaled_size(height, width, target_h, target_w)

    x_CHW = _resize_channels(image_HWC, new_h, new_w, device)

    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    out_HWC = torch.zeros(target_h, target_w, 3, dtype=torch.float32)
    out_HWC[top:top + new_h, left:left + new_w] = x_CHW.permute(1, 2, 0)
    mask_HW = torch.zeros(target_h, target_w, dtype=torch.bool)
    mask_HW[top:top + new_h, left:left + new_w] = True
    if settings.do_normalize:
        # Pad first, normalise after: padding becomes -mean/std, as in the released code.
        mean = torch.tensor(settings.image_mean, dtype=torch.float32)
        std = torch.tensor(settings.image_std, dtype=torch.float32)
        out_HWC = (out_HWC - mean) / std
    return out_HWC, mask_HW


@functools.lru_cache(maxsize=64)
def _tiling_candidates(window: int, max_crops: int) -> tuple[list, np.ndarray]:
    """Every (i, j) with i * j <= max_crops, by crop count then rows, and their sizes in pixels
    (read-only): O(max_crops log max_crops) pairs, not max_crops**2; built once per geometry,
    not per image (select_tiling runs for every request)."""
    pairs = ((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops // i + 1))
    tilings = sorted(pairs, key=lambda t: (t[0] * t[1], t[0]))
    cand_N2 = np.array(tilings, dtype=np.int32) * window
    cand_N2.flags.writeable = False
    return tilings, cand_N2


def select_tiling(h: int, w: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image whose margin-reduced size is h x w (§4.3).

    h and w may be <= 0 for images under 112 px: float32 division then yields inf or negative
    scales, which the rules below handle just as the released code does.
    """
    tilings, cand_N2 = _tiling_candidates(window, max_crops)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_N2 = cand_N2.astype(np.float32) / np.array([h, w], dtype=np.float32)
    scale_N = scale_N2.min(axis=-1)
    if np.all(scale_N < 1):
        ix = int(np.argmax(scale_N))   # must downscale: the least downscaling, first on ties
    else:
        ix = int(np.argmin(np.where(scale_N < 1.0, np.float32(1e10), scale_N)))  # least upscaling
    return tilings[ix]


def patchify(x_HWC: torch.Tensor, patch: int) -> torch.Tensor:
    """[H, W, C] -> [(H/p)*(W/p), p*p*C]: patches row-major, inside a patch (dy, dx, c), c fastest."""
    H, W, C = x_HWC.shape
    x = x_HWC.reshape(H // patch, patch, W // patch, patch, C).permute(0, 2, 1, 3, 4)
    return x.reshape((H // patch) * (W // patch), patch * patch * C)


@dataclasses.dataclass(frozen=True)
class ImageTokenIds:
    start: int
    end: int
    patch: int
    col: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one image's tokens go: tiling and the high-res pooled grid (nR x nC)."""

    tiling: tuple[int, int]
    grid: tuple[int, int]

    @property
    def n_crops(self) -> int:
        return 1 + self.tiling[0] * self.tiling[1]


def image_layout(height: int, width: int, settings: ImageSettings) -> Layout:
    """Tiling and pooled grid for an H x W image; cheap (no pixels touched)."""
    m = settings.margin_pixels
    th, tw = select_tiling(height - m, width - m, settings.window_size, settings.max_crops)
    side = sum(settings.overlap_margins)
    # Patches per side of the whole canvas, pooled 2x2 (rounding up).
    n_rows = (th * settings.window_patches + side + 1) // 2
    n_cols = (tw * settings.window_patches + side + 1) // 2
    return Layout(tiling=(th, tw), grid=(n_rows, n_cols))


def image_tokens(layout: Layout, settings: ImageSettings, ids: ImageTokenIds) -> np.ndarray:
    """The image's token ids (§4.4 step 7): global block (12 rows), then the high-res block."""
    def block(rows: int, cols: int) -> list[int]:
        return [ids.start] + ([ids.patch] * cols + [ids.col]) * rows + [ids.end]

    return np.array(block(settings.image_token_length_h, settings.image_token_length_w)
                    + block(*layout.grid), dtype=np.int64)


def n_image_tokens(layout: Layout, settings: ImageSettings) -> int:
    th, tw = settings.image_token_length_h, settings.image_token_length_w
    n_rows, n_cols = layout.grid
    return (2 + th * (tw + 1)) + (2 + n_rows * (n_cols + 1))


def image_input_idx(tokens: np.ndarray, layout: Layout, settings: ImageSettings,
                    ids: ImageTokenIds) -> np.ndarray:
    """int32 [T, K]: position in `tokens` of each pooled cell's <im_patch>, -100 for dropped cells.

    Derived from the token sequence itself: the first K <im_patch> tokens are the global view's
    cells in row-major order, the rest the high-res grid's. A tile keeps only the cells inside its
    window (interior sides drop `margin/2` pooled cells of overlap); cell (r, c) of tile (i, j)
    sits at high-res pooled (R, C) = (i*window/2 + r, j*window/2 + c).
    """
    positions = np.nonzero(tokens == ids.patch)[0].astype(np.int32)
    K = settings.tokens_per_crop
    kh, kw = settings.image_token_length_h, settings.image_token_length_w
    n_rows, n_cols = layout.grid
    assert positions.size == K + n_rows * n_cols
    glob, hires_RC = positions[:K], positions[K:].reshape(n_rows, n_cols)

    lo_m, hi_m = settings.overlap_margins[0] // 2, settings.overlap_margins[1] // 2
    step = settings.window_patches // 2
    th, tw = layout.tiling
    out_TK = np.full((layout.n_crops, kh, kw), -100, dtype=np.int32)
    out_TK[0] = glob.reshape(kh, kw)
    for i in range(th):
        r0, r1 = (0 if i == 0 else lo_m), (kh if i == th - 1 else kh - hi_m)
        for j in range(tw):
            c0, c1 = (0 if j == 0 else lo_m), (kw if j == tw - 1 else kw - hi_m)
            R0, C0 = i * step + r0, j * step + c0
            out_TK[1 + i * tw + j, r0:r1, c0:c1] = hires_RC[R0:R0 + r1 - r0, C0:C0 + c1 - c0]
    return out_TK.reshape(layout.n_crops, K)


@dataclasses.dataclass
class ImageInputs:
    images: torch.Tensor           # [T, P, Dp] float32
    image_masks: torch.Tensor      # [T, P] float32 (legacy off-by-one, last row -1)
    image_input_idx: np.ndarray    # [T, K] int32, relative to the first image token
    tokens: np.ndarray             # [N_img] int64
    layout: Layout


def preprocess_image(image_HWC: np.ndarray, settings: ImageSettings, ids: ImageTokenIds,
                     device: torch.device | str | None = None, *,
                     backend: str | None = None,
                     size: tuple[int, int] | None = None) -> ImageInputs:
    """uint8 RGB [H, W, 3] -> crops, masks, token layout and feature positions of one image.

    backend: "auto" (default; or $MOLMOE_PREPROCESS) runs the native op when it is built and the
    Python path otherwise (warning once), "native" requires the op, "python" is the reference.
    device: a CUDA device runs the pixel work there (the op's CUDA path; images and masks are
    returned on that device); None is the CPU.
    size: the picture's (H, W) when image_HWC is a reduced (fast, draft-mode) decode of it: the
    layout and resized sizes are the full picture's, only the source pixels are fewer.
    """
    if image_HWC.dtype != np.uint8 or image_HWC.ndim != 3 or image_HWC.shape[2] != 3:
        raise UsageError(f"expected a uint8 [H, W, 3] array, got {image_HWC.dtype} "
                         f"{list(image_HWC.shape)} (use molmoe.processing.load_image)")
    height, width = size = tuple(size) if size is not None else image_HWC.shape[:2]
    layout = image_layout(height, width, settings)
    how = native.choose(backend, device)
    if how == "python":
        images_TPD, masks_TP = _crops_python(image_HWC, size, layout, settings, device)
    else:
        images_TPD, masks_TP = _crops_op(image_HWC, size, layout, settings, device)
    tokens, input_idx = _token_layout(layout, settings, ids)
    # copies: the caller owns what it is given (the cached arrays are read-only)
    return ImageInputs(images=images_TPD, image_masks=masks_TP, image_input_idx=input_idx.copy(),
                       tokens=tokens.copy(), layout=layout)


@functools.lru_cache(maxsize=256)
def _token_layout(layout: Layout, settings: ImageSettings,
                  ids: ImageTokenIds) -> tuple[np.ndarray, np.ndarray]:
    """image_tokens and image_input_idx of a layout (no pixels involved), read-only: images of
    one size, as a camera or a batch sends them, reuse them instead of rebuilding them."""
    tokens = image_tokens(layout, settings, ids)
    input_idx = image_input_idx(tokens, layout, settings, ids)
    tokens.flags.writeable = False
    input_idx.flags.writeable = False
    return tokens, input_idx


def canvas_size(layout: Layout, settings: ImageSettings) -> tuple[int, int]:
    """(H, W) of the tile canvas: tiles every window_size pixels, plus the margins."""
    th, tw = layout.tiling
    stride, margin = settings.window_size, settings.margin_pixels
    return th * stride + margin, tw * stride + margin


def _crops_op(image_HWC: np.ndarray, size: tuple[int, int], layout: Layout,
              settings: ImageSettings, device) -> tuple[torch.Tensor, torch.Tensor]:
    """images and masks through molmoe::preprocess_crops (native CPU op, or the CUDA path)."""
    height, width = size
    canvas = canvas_size(layout, settings)
    src = _as_tensor(image_HWC)
    crop = settings.crop_size
    args = dict(
        canvas=canvas, canvas_resized=scaled_size(height, width, *canvas),
        global_resized=scaled_size(height, width, crop, crop), tiling=layout.tiling, crop=crop,
        stride=settings.window_size, patch=settings.image_patch_size, mean=settings.image_mean,
        std=settings.image_std, normalize=settings.do_normalize)
    if device is not None and torch.device(device).type == "cuda":
        return native.crops_on_device(src, torch.device(device), **args)
    return native.preprocess_crops(src, **args)


def _crops_python(image_HWC: np.ndarray, size: tuple[int, int], layout: Layout,
                  settings: ImageSettings, device) -> tuple[torch.Tensor, torch.Tensor]:
    """images and masks by the reference Python path (the released processor's arithmetic)."""
    th, tw = layout.tiling
    crop, stride, p = settings.crop_size, settings.window_size, settings.image_patch_size
    canvas_HWC, canvas_mask_HW = resize_and_pad(image_HWC, canvas_size(layout, settings),
                                                settings, device, size=size)
    global_HWC, _ = resize_and_pad(image_HWC, settings.base_image_input_size, settings, device,
                                   size=size)

    crops, masks = [patchify(global_HWC, p)], []
    for i in range(th):
        for j in range(tw):
            y0, x0 = i * stride, j * stride
            crops.append(patchify(canvas_HWC[y0:y0 + crop, x0:x0 + crop], p))
            tile_mask = canvas_mask_HW[y0:y0 + crop, x0:x0 + crop, None]
            # Fraction of valid pixels per patch; sums of 0/1 are exact, one f32 division.
            masks.append(patchify(tile_mask, p).float().sum(-1) / np.float32(p * p))
    # Legacy off-by-one (§4.5): tile masks only, then one row of -1, so row k meets crop k.
    masks.append(torch.full((settings.crop_patches ** 2,), -1.0))
    return torch.stack(crops), torch.stack(masks)
