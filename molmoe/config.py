"""Typed configs for the four Molmo 0924 models, parsed from their official `config.json`.

Two config.json formats exist (spec §1.2): MolmoE's carries every field (training names:
`d_model`, `n_layers`, `moe_*`, a `vision_backbone` block); the dense models' carries only HF names
(`hidden_size`, `num_hidden_layers`, ...) and the rest is hard-coded in their `modeling_molmo.py`.
Both are parsed into the same `MolmoConfig`, with the hard-coded values filled in here.

Validation (issue 10). Every config, however it is made (preset, `from_dict`, an official
config.json, the `molmoe` block `molmoe convert` writes), is checked by the dataclasses'
`__post_init__` before anything is allocated: types, positivity, divisibility, ranges and the caps
below. Errors are `ConfigError`s naming the file, the JSON key and the value.

Types are strict: an int field takes a JSON integer only. `true` is not 1, and `2048.0` (or
`1e9`, which JSON parses as a float) is refused rather than truncated: the released files write
integers, and a float in an int field means the file was not written by the code that trained the
model. Float fields (`rope_theta`, eps) take integers too (`"rope_theta": 10000` is common).

Caps (each a sanity bound far above every released model, so a typo or a hostile file is refused
with a message instead of hanging or exhausting memory while the model is built):

| cap                  | value          | why                                                |
|----------------------|----------------|----------------------------------------------------|
| MAX_LAYERS           | 1024           | 72B has 80 decoder layers, the ViT 23              |
| MAX_EXPERTS          | 4096           | MolmoE has 64; the largest public MoEs have 256    |
| MAX_VOCAB            | 2**22 (4.2M)   | largest released vocab 152k; largest public ~262k  |
| MAX_WIDTH            | 2**17 (131072) | d_model, FFN, ViT widths; 72B's widest is 29568    |
| MAX_PATCHES_PER_CROP | 4096 (64x64)   | ViT attention is quadratic in it; released 576     |
| MIN_POSITIONS        | 64             | fewer cannot hold a short text prompt and answer   |
| MAX_POSITIONS        | 2**24          | float32 RoPE positions are exact up to 2**24       |
| MAX_PARAMS           | 4 x Molmo-72B  | ~293e9; $MOLMOE_MAX_PARAMS overrides               |
| MIN_NORM_EPS         | 1.2e-38        | float32's smallest normal; less rounds to 0 in fp32|
| rope_theta           | 1 .. 3.4e38    | < 1: frequencies above 1 rad/position, growing as  |
|                      |                | 1/theta; above float32's max it is inf             |

Values the model does not implement are refused, not ignored: see `_FIXED_MOLMOE` /
`_FIXED_DENSE` / `_FIXED_VISION` (checked only where the key is present) and the `pool_size` /
`block_type` rules. `check_memory` refuses a load whose weights would not fit (see there).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import warnings
from dataclasses import dataclass, field

from molmoe.errors import MolmoeError, is_int

SUPPORTED_MODEL_TYPES = ("molmo",)
FAMILIES = ("molmoe", "dense")

MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_VOCAB = 2**22
MAX_WIDTH = 2**17
MAX_PATCHES_PER_CROP = 4096
MIN_POSITIONS = 64
MAX_POSITIONS = 2**24
MOLMO_72B_PARAMS = 73_308_285_952  # param_count(preset("molmo-72b")); a test keeps it in sync
MAX_PARAMS_ENV = "MOLMOE_MAX_PARAMS"
MIN_NORM_EPS = 1.1754943508222875e-38  # float32 tiny
MAX_FLOAT32 = 3.4028234663852886e38
# check_memory: set to 0 to skip the "do the weights fit" check (e.g. with swap you trust).
MEMORY_CHECK_ENV = "MOLMOE_MEMORY_CHECK"


def max_params() -> int:
    """The parameter-count sanity bound: 4x Molmo-72B, or $MOLMOE_MAX_PARAMS."""
    value = os.environ.get(MAX_PARAMS_ENV)
    if value is None:
        return 4 * MOLMO_72B_PARAMS
    try:
        bound = float(value)
    except ValueError:
        bound = math.nan
    if not (math.isfinite(bound) and bound >= 1):
        raise ConfigError(f"${MAX_PARAMS_ENV}={value!r}: expected a finite number of parameters "
                          ">= 1") from None
    return int(bound)


class ConfigError(MolmoeError):
    pass


class InsufficientMemoryError(MolmoeError):
    """An allocation (the weights, a KV cache) would not fit on its device."""


class _FieldError(ConfigError):
    """A bad value of one dataclass field; `from_hf_config` renames the field to its JSON key."""

    def __init__(self, owner: type, name: str, value, problem: str, other: str | None = None):
        """`problem` may name a second field of the same dataclass as "{other}"."""
        self.owner, self.name, self.value, self.problem = owner.__name__, name, value, problem
        self.other = other
        super().__init__(self.describe(lambda field: f"{self.owner}.{field}"))

    def describe(self, key_of) -> str:
        """The message with each field named by `key_of(field name)`."""
        problem = self.problem.replace("{other}", key_of(self.other)) if self.other else \
            self.problem
        return f"{key_of(self.name)} = {_short(self.value)} {problem}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------- field checks

def _check_int(obj, name: str, lo: int, hi: int) -> int:
    v = getattr(obj, name)
    if not is_int(v):
        raise _FieldError(type(obj), name, v, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        problem = f"must be in {lo}..{hi}" if lo < hi else f"is not implemented (only {lo} is)"
        raise _FieldError(type(obj), name, v, problem)
    return v


def _check_bool(obj, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise _FieldError(type(obj), name, v, f"must be true or false, not {type(v).__name__}")


def _check_float(obj, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
    """A finite number in [lo, hi) (or (lo, hi) with lo_open); stored as a float."""
    v = getattr(obj, name)
    if not (isinstance(v, float) or is_int(v)):
        raise _FieldError(type(obj), name, v, f"must be a number, not {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not (math.isfinite(f) and (lo < f if lo_open else lo <= f) and f < hi):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise _FieldError(type(obj), name, v, f"must be a finite number {low} and < {hi:g}")
    object.__setattr__(obj, name, f)


def _check_divides(obj, a: str, b: str) -> None:
    if getattr(obj, a) % getattr(obj, b):
        raise _FieldError(type(obj), a, getattr(obj, a),
                          f"must be a multiple of {{other}} = {getattr(obj, b)}", other=b)


# ------------------------------------------------------------------------------- configs

@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """CLIP ViT-L/14-336 truncated to 23 blocks, plus the 2x2 pooling connector (spec §1.3)."""

    image_size: int = 336
    patch_size: int = 14
    emb_dim: int = 1024
    num_heads: int = 16
    num_layers: int = 23
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)  # indices into the block outputs, concatenated in order
    pool_size: int = 2  # 2x2 attention-meanq pooling

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "patch_size", "emb_dim", "mlp_dim"):
            _check_int(self, name, 1, MAX_WIDTH)
        _check_int(self, "num_heads", 1, self.emb_dim)
        _check_int(self, "num_layers", 1, MAX_LAYERS)
        _check_int(self, "pool_size", 2, 2)  # the pooling op implements 2x2 only
        _check_float(self, "norm_eps", 0.0, 1.0, lo_open=True)
        if self.norm_eps < MIN_NORM_EPS:
            raise _FieldError(VisionConfig, "norm_eps", self.norm_eps,
                              f"is below float32's smallest normal {MIN_NORM_EPS:.3g}")
        _check_divides(self, "image_size", "patch_size")
        _check_divides(self, "emb_dim", "num_heads")
        if self.grid % self.pool_size:
            raise _FieldError(VisionConfig, "image_size", self.image_size,
                              f"gives {self.grid} patches per side, not a multiple of the "
                              f"{self.pool_size}x{self.pool_size} pooling")
        if self.num_patches > MAX_PATCHES_PER_CROP:
            raise _FieldError(VisionConfig, "image_size", self.image_size,
                              f"gives {self.num_patches} patches per crop (cap "
                              f"{MAX_PATCHES_PER_CROP})")
        layers = self.vit_layers
        if isinstance(layers, list):
            layers = tuple(layers)
            object.__setattr__(self, "vit_layers", layers)
        n = self.num_layers
        if not isinstance(layers, tuple) or not 1 <= len(layers) <= n or \
                not all(is_int(i) and -n <= i < n for i in layers):
            raise _FieldError(VisionConfig, "vit_layers", layers,
                              f"must list 1..{n} block indices in {-n}..{n - 1}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @property
    def grid(self) -> int:  # patches per side: 24
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # 576
        return self.grid**2

    @property
    def patch_dim(self) -> int:  # 588 = 14*14*3
        return self.patch_size**2 * 3

    @property
    def feature_dim(self) -> int:  # 2048: the concatenated ViT layers
        return self.emb_dim * len(self.vit_layers)

    @property
    def tokens_per_crop(self) -> int:  # 144
        return (self.grid // self.pool_size) ** 2


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = 64
    top_k: int = 8
    expert_hidden: int = 1024  # SwiGLU width of one expert
    renormalize: bool = False  # MolmoE does not renormalise the top-k weights (spec §3.5)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_int(self, "num_experts", 1, MAX_EXPERTS)
        _check_int(self, "top_k", 1, self.num_experts)
        _check_int(self, "expert_hidden", 1, MAX_WIDTH)
        _check_bool(self, "renormalize")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int  # dense SwiGLU width; for MoE models the projector width is kept here too
    vocab_size: int  # tokenizer ids
    embedding_size: int  # rows of wte.embedding and of the LM head
    additional_vocab_size: int = 128
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over the full q (D) and k (Hkv*Dh) vectors
    norm_after: bool = False  # 7B-O: norms applied to sublayer outputs
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    moe: MoEConfig | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_int(self, "d_model", 1, MAX_WIDTH)
        _check_int(self, "n_layers", 1, MAX_LAYERS)
        _check_int(self, "n_heads", 1, self.d_model)
        _check_int(self, "n_kv_heads", 1, self.n_heads)
        _check_int(self, "ffn_hidden", 1, MAX_WIDTH)
        _check_int(self, "vocab_size", 1, MAX_VOCAB)
        _check_int(self, "embedding_size", self.vocab_size, MAX_VOCAB)
        _check_int(self, "additional_vocab_size", 0, MAX_VOCAB)
        _check_int(self, "max_position_embeddings", MIN_POSITIONS, MAX_POSITIONS)
        for name in ("qkv_bias", "qk_norm", "norm_after"):
            _check_bool(self, name)
        _check_float(self, "norm_eps", 0.0, 1.0, lo_open=True)
        if self.norm_eps < MIN_NORM_EPS:
            raise _FieldError(TextConfig, "norm_eps", self.norm_eps,
                              f"is below float32's smallest normal {MIN_NORM_EPS:.3g}")
        _check_float(self, "rope_theta", 1.0, MAX_FLOAT32)
        _check_divides(self, "d_model", "n_heads")
        _check_divides(self, "n_heads", "n_kv_heads")
        if self.head_dim % 2:  # rotate-half RoPE pairs dimension i with i + head_dim/2
            raise _FieldError(TextConfig, "n_heads", self.n_heads,
                              f"gives an odd head dim {self.head_dim} (RoPE needs an even one)")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise _FieldError(TextConfig, "moe", self.moe, "must be a MoEConfig or None")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True, kw_only=True)
class MolmoConfig:
    text: TextConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector_hidden: int  # SwiGLU width of the image projector
    # "molmoe": MolmoE's module tree and numerics; "dense": 7B-D/7B-O/72B (spec §2, §3.1, §8)
    family: str = "dense"
    name: str = "custom"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, cls in (("text", TextConfig), ("vision", VisionConfig)):
            if not isinstance(getattr(self, name), cls):
                raise _FieldError(MolmoConfig, name, getattr(self, name),
                                  f"must be a {cls.__name__}")
        _check_int(self, "projector_hidden", 1, MAX_WIDTH)
        if self.family not in FAMILIES:
            raise _FieldError(MolmoConfig, "family", self.family, f"must be one of {FAMILIES}")
        if not isinstance(self.name, str):
            raise _FieldError(MolmoConfig, "name", self.name, "must be a string")
        n, cap = param_count(self), max_params()
        if n > cap:
            raise ConfigError(f"the model would have {n / 1e9:.1f}e9 parameters "
                              f"({n * 4 / 2**30:.0f} GiB at float32), above the sanity bound of "
                              f"{cap / 1e9:.0f}e9 (4x Molmo-72B; ${MAX_PARAMS_ENV} raises it)")

    @property
    def is_moe(self) -> bool:
        return self.text.moe is not None

    def replace(self, **changes) -> "MolmoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MolmoConfig":
        """Inverse of `to_dict`; every level is checked (unknown or missing keys, types)."""
        d = _fields_of(cls, d, "")
        text = _fields_of(TextConfig, d.get("text"), "text.")
        if text.get("moe") is not None:
            text["moe"] = MoEConfig(**_fields_of(MoEConfig, text["moe"], "text.moe."))
        d["text"] = TextConfig(**text)
        if "vision" in d:
            d["vision"] = VisionConfig(**_fields_of(VisionConfig, d["vision"], "vision."))
        return cls(**d)


def _fields_of(cls, d, path: str) -> dict:
    """`d` as keyword arguments of dataclass `cls`: a dict with no unknown and no missing keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path.rstrip('.') or 'the config'} must be an object, got "
                          f"{_short(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown field {path}{unknown[0]}")
    for name, f in fields.items():
        if name not in d and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing field {path}{name}")
    return dict(d)


def param_count(config: MolmoConfig) -> int:
    """Number of parameters of `Molmo(config)`, in closed form (no module is built)."""
    v, t = config.vision, config.text
    E, M, C, H = v.emb_dim, v.mlp_dim, v.feature_dim, config.projector_hidden
    vit_block = 4 * E + 4 * (E * E + E) + (E * M + M) + (M * E + E)  # 2 LNs, attention, MLP
    vit = E + (v.num_patches + 1) * E + v.patch_dim * E + 2 * E + v.num_layers * vit_block
    pooling = 3 * (C * E + E) + (E * E + E)
    vision = vit + 2 * C + pooling + (2 * E * H + H * t.d_model)  # + pad_embed, projector
    D, kv = t.d_model, t.kv_dim
    attn = D * (D + 2 * kv) + (D + 2 * kv) * t.qkv_bias + (D + kv) * t.qk_norm + D * D
    if t.moe is None:
        ffn = 3 * D * t.ffn_hidden
    else:
        ffn = D * t.moe.num_experts + 3 * t.moe.num_experts * t.moe.expert_hidden * D
    block = 2 * D + attn + ffn
    text = (t.embedding_size + t.additional_vocab_size) * D + t.n_layers * block + D \
        + D * t.embedding_size
    return vision + text


# --------------------------------------------------------------------------------- presets

def _molmoe_1b() -> MolmoConfig:
    return MolmoConfig(
        name="molmoe-1b", family="molmoe", projector_hidden=1024,
        text=TextConfig(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_hidden=1024,
                        vocab_size=50280, embedding_size=50304, qk_norm=True, norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=32768,
                        moe=MoEConfig(num_experts=64, top_k=8, expert_hidden=1024)))


def _molmo_7b_d() -> MolmoConfig:
    return MolmoConfig(
        name="molmo-7b-d", family="dense", projector_hidden=18944,
        text=TextConfig(d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_hidden=18944,
                        vocab_size=152064, embedding_size=152064, qkv_bias=True, norm_eps=1e-6,
                        rope_theta=1000000.0))


def _molmo_7b_o() -> MolmoConfig:
    return MolmoConfig(
        name="molmo-7b-o", family="dense", projector_hidden=11008,
        text=TextConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
                        vocab_size=100278, embedding_size=100352, qk_norm=True, norm_after=True,
                        norm_eps=1e-6, rope_theta=500000.0))


def _molmo_72b() -> MolmoConfig:
    return MolmoConfig(
        name="molmo-72b", family="dense", projector_hidden=29568,
        text=TextConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=29568,
                        vocab_size=152064, embedding_size=152064, qkv_bias=True, norm_eps=1e-5,
                        rope_theta=1000000.0))


TINY_VISION = VisionConfig(emb_dim=32, num_heads=2, num_layers=3, mlp_dim=64, vit_layers=(-1, -3))


def _tiny(name: str, family: str, **text) -> MolmoConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=96, vocab_size=300,
                embedding_size=320, norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096)
    base.update(text)
    return MolmoConfig(name=name, family=family, vision=TINY_VISION,
                       projector_hidden=base["ffn_hidden"], text=TextConfig(**base))


PRESETS = {
    "molmoe-1b": _molmoe_1b,
    "molmo-7b-d": _molmo_7b_d,
    "molmo-7b-o": _molmo_7b_o,
    "molmo-72b": _molmo_72b,
    # Tiny sizes for tests: same structure, each variant's switches, random weights.
    "tiny-molmoe": lambda: _tiny("tiny-molmoe", "molmoe", qk_norm=True, ffn_hidden=32,
                                 moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=32)),
    "tiny-7b-d": lambda: _tiny("tiny-7b-d", "dense", n_kv_heads=2, qkv_bias=True, norm_eps=1e-6,
                               rope_theta=1e6),
    "tiny-7b-o": lambda: _tiny("tiny-7b-o", "dense", qk_norm=True, norm_after=True, norm_eps=1e-6,
                               rope_theta=5e5),
}


def preset(name: str) -> MolmoConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------ official config.json

# Keys the model reads no value from, but whose other values it does not implement: where the key
# is present only these values are accepted (the released ones, spec §1.1/§1.3).
_FIXED_MOLMOE = {
    "activation_type": ("swiglu",), "alibi": (False,), "attention_type": ("sdpa",),
    "attn_logit_softcapping": (None,), "attention_layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None), "block_group_size": (1,), "clip_qkv": (None,),
    "final_logit_softcapping": (None,), "float32_attention": (True,),
    "image_padding_embed": ("pad_and_partial_pad",), "image_pooling_2d": ("attention-meanq",),
    "image_pooling_w": (2,), "image_projector": ("mlp",), "include_bias": (False,),
    "layer_norm_type": ("rms",), "layer_norm_with_affine": (True,), "moe_dropless": (True,),
    "moe_interleave": (False,), "moe_shared_expert": (False,),
    "multi_query_attention": (None, False), "normalize_input_embeds": (False,), "rope": (True,),
    "rope_full_precision": (True,), "rope_impl": ("llama",), "scale_logits": (False,),
    "unconditioned": (False,), "use_cls_feature": (False,), "weight_tying": (False,),
}
_FIXED_DENSE = {"clip_qkv": (None,), "layer_norm_type": ("rms",),
                "tie_word_embeddings": (False, None), "weight_tying": (False, None)}
_FIXED_VISION = {"image_model_type": ("openai",), "image_mlp_activations": ("quick_gelu",),
                 "resize_mode": ("default",)}

# Dataclass field -> the JSON key it comes from, per format (error messages name the JSON key).
_TEXT_KEYS = {"qk_norm": "attention_layer_norm", "norm_eps": "layer_norm_eps"}
_VISION_KEYS = {"image_size": "image_default_input_size", "patch_size": "image_patch_size",
                "emb_dim": "image_emb_dim", "num_heads": "image_num_heads",
                "num_layers": "image_num_layers", "mlp_dim": "image_mlp_dim",
                "norm_eps": "image_norm_eps"}
_KEYS = {
    "molmoe": {
        **{("TextConfig", k): v for k, v in _TEXT_KEYS.items()},
        ("TextConfig", "ffn_hidden"): "mlp_hidden_size/2",
        ("MolmoConfig", "projector_hidden"): "mlp_hidden_size/2",
        ("MoEConfig", "num_experts"): "moe_num_experts", ("MoEConfig", "top_k"): "moe_top_k",
        ("MoEConfig", "expert_hidden"): "mlp_hidden_size/2",
        **{("VisionConfig", k): f"vision_backbone.{v}" for k, v in _VISION_KEYS.items()},
        ("VisionConfig", "pool_size"): "image_pooling_h",
        ("VisionConfig", "vit_layers"): "vit_layers",
    },
    "dense": {
        **{("TextConfig", k): v for k, v in _TEXT_KEYS.items()},
        ("TextConfig", "d_model"): "hidden_size", ("TextConfig", "n_layers"): "num_hidden_layers",
        ("TextConfig", "n_heads"): "num_attention_heads",
        ("TextConfig", "n_kv_heads"): "num_key_value_heads",
        ("TextConfig", "ffn_hidden"): "intermediate_size/2",
        ("MolmoConfig", "projector_hidden"): "intermediate_size/2",
    },
    "block": {},  # the `molmoe` block: dataclass paths, see _json_key
}
_BLOCK_PREFIX = {"MolmoConfig": "molmoe.", "TextConfig": "molmoe.text.",
                 "MoEConfig": "molmoe.text.moe.", "VisionConfig": "molmoe.vision."}


def _json_key(fmt: str, owner: str, name: str) -> str:
    if fmt == "block":
        return _BLOCK_PREFIX[owner] + name
    return _KEYS[fmt].get((owner, name), name if owner == "TextConfig" else f"{owner}.{name}")


class _Json:
    """Reads from one JSON object; errors name the key (with `prefix` for nested objects)."""

    def __init__(self, obj: dict, prefix: str = ""):
        self.obj, self.prefix = obj, prefix

    def get(self, key: str, default=dataclasses.MISSING):
        """The value; null or absent -> `default` (absent and no default: missing field)."""
        value = self.obj.get(key)
        if value is not None:
            return value
        if default is dataclasses.MISSING:
            raise ConfigError(f"missing field {self.prefix + key!r}")
        return default

    def int(self, key: str, default=dataclasses.MISSING) -> int:
        value = self.get(key, default)
        if not is_int(value):
            raise ConfigError(f"{self.prefix}{key} = {_short(value)} must be an integer, not "
                              f"{type(value).__name__}")
        return value

    def bool(self, key: str) -> bool:
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.prefix}{key} = {_short(value)} must be true or false")
        return value

    def list(self, key: str, default, length: int | None = None) -> tuple:
        value = self.get(key, default)
        if not isinstance(value, (list, tuple)) or length is not None and len(value) != length:
            n = "a list" if length is None else f"a list of {length}"
            raise ConfigError(f"{self.prefix}{key} = {_short(value)} must be {n}")
        return tuple(value)

    def object(self, key: str) -> "_Json":
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.prefix}{key} = {_short(value)} must be an object")
        return _Json(value, f"{self.prefix}{key}.")

    def check_fixed(self, fixed: dict) -> None:
        for key, allowed in fixed.items():
            if key in self.obj and not any(_same(self.obj[key], a) for a in allowed):
                shown = " or ".join(json.dumps(a) for a in allowed)
                raise ConfigError(f"{self.prefix}{key} = {_short(self.obj[key])} is not "
                                  f"implemented (molmoe supports {shown})")

    def check_equal(self, key: str, expected: int, what: str) -> None:
        if key in self.obj and not _same(self.obj[key], expected):
            raise ConfigError(f"{self.prefix}{key} = {_short(self.obj[key])} must equal "
                              f"{what} = {expected}")


def _same(value, allowed) -> bool:
    """JSON equality without Python's True == 1 == 1.0."""
    return value is None if allowed is None else type(value) is type(allowed) and value == allowed


def from_hf_config(cfg: dict, *, source: str = "config.json") -> MolmoConfig:
    """Parse an official (or molmoe-converted) `config.json` dict; ConfigError names `source`."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: must be a JSON object, got {type(cfg).__name__} "
                          f"{_short(cfg)}")
    fmt = "block" if "molmoe" in cfg else "molmoe" if "d_model" in cfg else "dense"
    try:
        if fmt == "block":  # written by `molmoe convert`: our own config beside the original
            block = MolmoConfig.from_dict(cfg["molmoe"])
        elif not any(_same(cfg.get("model_type"), t) for t in SUPPORTED_MODEL_TYPES):
            raise ConfigError(f"unsupported model_type {_short(cfg.get('model_type'))}; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Molmo 0924: "
                              "MolmoE-1B, Molmo-7B-D, Molmo-7B-O, Molmo-72B)")
        elif fmt == "molmoe":  # MolmoE format (training field names)
            return _from_molmoe_format(_Json(cfg))
        elif "hidden_size" in cfg:
            return _from_dense_format(_Json(cfg))
        else:
            raise ConfigError("neither 'd_model' (MolmoE format) nor 'hidden_size' (dense Molmo "
                              "format) present")
    except ConfigError as e:
        what = e.describe(functools.partial(_json_key, fmt, e.owner)) \
            if isinstance(e, _FieldError) else str(e)
        where = "malformed 'molmoe' config block: " if fmt == "block" else ""
        raise ConfigError(f"{source}: {where}{what}") from None
    # The original fields beside the block (what other tools read) are parsed, so validated, too,
    # and must describe the same model: an edit of one of them is refused, never silently ignored.
    rest = {k: v for k, v in cfg.items() if k != "molmoe"}
    if "d_model" in rest or "hidden_size" in rest:  # a block alone (tests' tiny models) is whole
        diff = _first_difference(from_hf_config(rest, source=source), block)
        if diff:
            owner, name, top, ours = diff
            raise ConfigError(
                f"{source}: {_json_key('molmoe' if 'd_model' in rest else 'dense', owner, name)}"
                f" = {_short(top)} disagrees with the 'molmoe' block's "
                f"{_json_key('block', owner, name)} = {_short(ours)}; make them agree")
    return block


def _first_difference(a, b) -> tuple[str, str, object, object] | None:
    """(dataclass, field, a's value, b's value) of the first field where two configs differ;
    `name` is a label, not the model, and a tuple equals the list JSON gives."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and type(x) is type(y):
            diff = _first_difference(x, y)
            if diff:
                return diff
        elif f.name != "name" and (list(x) if isinstance(x, tuple) else x) != (
                list(y) if isinstance(y, tuple) else y):
            return type(a).__name__, f.name, x, y
    return None


def _swiglu_width(fused: int, key: str) -> int:
    """The SwiGLU width from a fused gate+up width, which must be even and positive."""
    if not 2 <= fused <= 2 * MAX_WIDTH or fused % 2:
        raise ConfigError(f"{key} = {fused} must be an even width in 2..{2 * MAX_WIDTH} "
                          "(gate and up halves)")
    return fused // 2


def _from_molmoe_format(j: _Json) -> MolmoConfig:
    j.check_fixed(_FIXED_MOLMOE)
    d_model, n_heads = j.int("d_model"), j.int("n_heads")
    if "mlp_hidden_size" in j.obj and j.obj["mlp_hidden_size"] is not None:
        hidden = _swiglu_width(j.int("mlp_hidden_size"), "mlp_hidden_size")
    else:  # mlp_hidden_size null -> mlp_ratio*d_model is the fused width, SwiGLU width is half
        hidden = _swiglu_width(j.int("mlp_ratio") * d_model, "mlp_ratio * d_model")
    block_type = j.get("block_type", "sequential")
    if not (_same(block_type, "moe") or _same(block_type, "sequential")):
        raise ConfigError(f"block_type = {_short(block_type)} is not implemented (molmoe "
                          "supports \"moe\" and \"sequential\")")
    moe = None
    if block_type == "moe":
        moe = MoEConfig(num_experts=j.get("moe_num_experts"), top_k=j.get("moe_top_k"),
                        expert_hidden=hidden)
    vision = _vision_block(j.object("vision_backbone"),
                           vit_layers=j.list("vit_layers", (-2, -9)),
                           pool_size=j.get("image_pooling_h", 2))
    text = TextConfig(
        d_model=d_model, n_layers=j.get("n_layers"), n_heads=n_heads,
        n_kv_heads=j.get("n_kv_heads", n_heads), ffn_hidden=hidden,
        vocab_size=j.get("vocab_size"),
        embedding_size=j.get("embedding_size", j.get("vocab_size")),
        additional_vocab_size=j.get("additional_vocab_size", 128),
        qkv_bias=j.bool("qkv_bias"), qk_norm=j.bool("attention_layer_norm"),
        norm_after=j.bool("norm_after"), norm_eps=j.get("layer_norm_eps", 1e-5),
        rope_theta=j.get("rope_theta", 10000.0),
        max_position_embeddings=j.get("max_position_embeddings",
                                      j.get("max_sequence_length", 4096)),
        moe=moe)
    if j.get("head_dim", None) is not None:
        j.check_equal("head_dim", text.head_dim, "d_model / n_heads")
    return MolmoConfig(text=text, vision=vision, projector_hidden=hidden,
                       family="molmoe" if moe else "dense", name="molmoe-1b" if moe else "custom")


def _vision_block(vb: _Json, *, vit_layers: tuple, pool_size) -> VisionConfig:
    """MolmoE's `vision_backbone` block; the keys the model does not read must agree with it."""
    vb.check_fixed(_FIXED_VISION)
    size = vb.list("image_default_input_size", [336, 336], length=2)
    if not _same(size[0], size[1]):
        raise ConfigError(f"{vb.prefix}image_default_input_size = {list(size)} must be square")
    v = VisionConfig(
        image_size=size[0], patch_size=vb.get("image_patch_size", 14),
        emb_dim=vb.get("image_emb_dim", 1024), num_heads=vb.get("image_num_heads", 16),
        num_layers=vb.get("image_num_layers", 23), mlp_dim=vb.get("image_mlp_dim", 4096),
        norm_eps=vb.get("image_norm_eps", 1e-5), vit_layers=vit_layers, pool_size=pool_size)
    vb.check_equal("image_num_key_value_heads", v.num_heads, "image_num_heads")
    vb.check_equal("image_head_dim", v.head_dim, "image_emb_dim / image_num_heads")
    vb.check_equal("image_pos_patch_size", v.patch_size, "image_patch_size")
    vb.check_equal("image_num_pos", v.num_patches + 1, "patches per crop + 1")
    return v


def _from_dense_format(j: _Json) -> MolmoConfig:
    j.check_fixed(_FIXED_DENSE)
    # intermediate_size is the fused ff_proj width (spec §1.1)
    hidden = _swiglu_width(j.int("intermediate_size"), "intermediate_size")
    n_heads = j.get("num_attention_heads")
    text = TextConfig(
        d_model=j.get("hidden_size"), n_layers=j.get("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=j.get("num_key_value_heads", n_heads), ffn_hidden=hidden,
        vocab_size=j.get("vocab_size"), embedding_size=j.get("embedding_size", j.get("vocab_size")),
        additional_vocab_size=128,  # hard-coded in modeling_molmo.py
        qkv_bias=j.bool("qkv_bias"), qk_norm=j.bool("attention_layer_norm"),
        norm_after=j.bool("norm_after"), norm_eps=j.get("layer_norm_eps", 1e-5),
        rope_theta=j.get("rope_theta", 10000.0),
        max_position_embeddings=j.get("max_position_embeddings", 4096))
    names = {(3584, 28): "molmo-7b-d", (4096, 32): "molmo-7b-o", (8192, 80): "molmo-72b"}
    # The vision tower, pooling and projector are hard-coded (spec §1.3); projector width = LLM
    # SwiGLU width.
    return MolmoConfig(text=text, projector_hidden=hidden, family="dense",
                       name=names.get((text.d_model, text.n_layers), "custom"))


def load_config(path: str | os.PathLike) -> MolmoConfig:
    """config.json -> MolmoConfig; an unreadable or invalid file is a ConfigError naming it."""
    from molmoe.fileio import read_json

    path = pathlib.Path(path)
    cfg = read_json(path, ConfigError)
    return from_hf_config(cfg, source=str(path))


# ------------------------------------------------------------------------- memory check

def weights_bytes(config: MolmoConfig, dtype) -> int:
    """Bytes of all weights at `dtype` (a torch.dtype)."""
    return param_count(config) * dtype.itemsize


def available_memory(device) -> tuple[int, str] | None:
    """(free bytes, what was measured) for a torch device; None where it cannot be measured."""
    import torch

    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None  # the load itself says that there is no CUDA
        free, total = torch.cuda.mem_get_info(device)
        # Memory PyTorch's allocator holds but no tensor uses (a cache just dropped, say) is
        # free for the next allocation too, though the driver counts it as taken.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device} (of {total / 2**30:.1f} GiB)"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
    except OSError:
        pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return total, "physical host memory"


def check_memory(config: MolmoConfig, directory: pathlib.Path, *, dtype, device,
                 stored_dtype=None) -> None:
    """Refuse a load whose weights would not fit where they go; the message gives both figures.

    Counts the bytes the load will allocate, not the checkpoint's size: weights moved to a CUDA
    device, or converted from a known stored dtype, are a full copy (refused when it does not fit).
    Safetensors memory-mapped on the CPU in their stored dtype stay file-backed pages (no anonymous
    copy; nothing is checked). Other CPU loads (a `.bin`, MoE experts that may need stacking, an
    unknown stored dtype) may or may not copy: those only warn. $MOLMOE_MEMORY_CHECK=0 skips the check.
    """
    import torch

    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return  # an invalid device is reported by the load itself
    mapped = any(directory.glob("*.safetensors"))
    certain = device.type != "cpu" or (stored_dtype is not None and stored_dtype != dtype)
    if not certain and mapped and stored_dtype is not None and not config.is_moe:
        return  # a pure memory map (MoE: unconverted experts may be stacked, a copy)
    check_allocation(weights_bytes(config, dtype), device, dtype, f"{directory}: the weights",
                     certain=certain)


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_allocation(need: int, device, dtype, what: str, *, certain: bool = True) -> None:
    """Refuse (`certain`) or warn about an allocation of `need` bytes on `device` that exceeds
    what the device has free; the message names `what` and both figures. Devices that cannot be
    measured pass. $MOLMOE_MEMORY_CHECK=0 skips the check."""
    import torch

    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return
    measured = available_memory(torch.device(device))
    if measured is None or need <= measured[0]:
        return
    have, where = measured
    message = (f"{what} need {_bytes(need)} at {str(dtype).removeprefix('torch.')} "
               f"on {device}, but there are only {_bytes(have)} {where}")
    if certain:
        raise InsufficientMemoryError(f"{message}; ${MEMORY_CHECK_ENV}=0 skips this check")
    warnings.warn(f"{message}; it may run out of memory", RuntimeWarning, stacklevel=3)
