"""Typed configs for the four Molmo 0924 models, parsed from their official `config.json`.

Two config.json formats exist (spec §1.2): MolmoE's carries every field (training names:
`d_model`, `n_layers`, `moe_*`, a `vision_backbone` block); the dense models' carries only HF names
(`hidden_size`, `num_hidden_layers`, ...) and the rest is hard-coded in their `modeling_molmo.py`.
Both are parsed into the same `MolmoConfig`, with the hard-coded values filled in here.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass, field

from molmoe.errors import MolmoeError

SUPPORTED_MODEL_TYPES = ("molmo",)


class ConfigError(MolmoeError):
    pass


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

    @property
    def is_moe(self) -> bool:
        return self.text.moe is not None

    def replace(self, **changes) -> "MolmoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MolmoConfig":
        text = dict(d["text"])
        if text.get("moe") is not None:
            text["moe"] = MoEConfig(**text["moe"])
        vision = dict(d["vision"])
        vision["vit_layers"] = tuple(vision["vit_layers"])
        return cls(text=TextConfig(**text), vision=VisionConfig(**vision),
                   projector_hidden=d["projector_hidden"], family=d["family"], name=d["name"])


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

def _require(cfg: dict, key: str, source: str):
    if key not in cfg:
        raise ConfigError(f"{source}: missing field {key!r}")
    return cfg[key]


def from_hf_config(cfg: dict, *, source: str = "config.json") -> MolmoConfig:
    """Parse an official (or molmoe-converted) `config.json` dict."""
    if "molmoe" in cfg:  # written by `molmoe convert`: our own config beside the original fields
        try:
            return MolmoConfig.from_dict(cfg["molmoe"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: malformed 'molmoe' config block "
                              f"({type(e).__name__}: {e})") from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: unsupported model_type {model_type!r}; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Molmo 0924: MolmoE-1B, Molmo-7B-D, "
                          "Molmo-7B-O, Molmo-72B)")
    if "d_model" in cfg:  # MolmoE format (training field names)
        return _from_molmoe_format(cfg, source)
    if "hidden_size" in cfg:
        return _from_dense_format(cfg, source)
    raise ConfigError(f"{source}: neither 'd_model' (MolmoE format) nor 'hidden_size' (dense "
                      "Molmo format) present")


def _from_molmoe_format(cfg: dict, source: str) -> MolmoConfig:
    r = lambda k: _require(cfg, k, source)  # noqa: E731
    d_model, n_heads = r("d_model"), r("n_heads")
    n_kv = cfg.get("n_kv_heads") or n_heads
    # MolmoE: mlp_hidden_size null -> mlp_ratio*d_model is the fused width, SwiGLU width is half.
    fused = cfg.get("mlp_hidden_size") or r("mlp_ratio") * d_model
    hidden = fused // 2
    moe = None
    if cfg.get("block_type") == "moe":
        moe = MoEConfig(num_experts=r("moe_num_experts"), top_k=r("moe_top_k"), expert_hidden=hidden)
    vb = cfg.get("vision_backbone") or {}
    vision = VisionConfig(
        image_size=(vb.get("image_default_input_size") or [336])[0],
        patch_size=vb.get("image_patch_size", 14), emb_dim=vb.get("image_emb_dim", 1024),
        num_heads=vb.get("image_num_heads", 16), num_layers=vb.get("image_num_layers", 23),
        mlp_dim=vb.get("image_mlp_dim", 4096), norm_eps=vb.get("image_norm_eps", 1e-5),
        vit_layers=tuple(cfg.get("vit_layers", (-2, -9))),
        pool_size=cfg.get("image_pooling_h", 2))
    text = TextConfig(
        d_model=d_model, n_layers=r("n_layers"), n_heads=n_heads, n_kv_heads=n_kv,
        ffn_hidden=hidden, vocab_size=r("vocab_size"),
        embedding_size=cfg.get("embedding_size") or r("vocab_size"),
        additional_vocab_size=cfg.get("additional_vocab_size", 128),
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)),
        norm_eps=cfg.get("layer_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
        max_position_embeddings=cfg.get("max_position_embeddings")
        or cfg.get("max_sequence_length", 4096),
        moe=moe)
    return MolmoConfig(text=text, vision=vision, projector_hidden=hidden,
                       family="molmoe" if moe else "dense", name="molmoe-1b" if moe else "custom")


def _from_dense_format(cfg: dict, source: str) -> MolmoConfig:
    r = lambda k: _require(cfg, k, source)  # noqa: E731
    d_model, n_heads = r("hidden_size"), r("num_attention_heads")
    hidden = r("intermediate_size") // 2  # intermediate_size is the fused ff_proj width (spec §1.1)
    text = TextConfig(
        d_model=d_model, n_layers=r("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_hidden=hidden,
        vocab_size=r("vocab_size"), embedding_size=cfg.get("embedding_size") or r("vocab_size"),
        additional_vocab_size=128,  # hard-coded in modeling_molmo.py
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        qk_norm=bool(cfg.get("attention_layer_norm", False)),
        norm_after=bool(cfg.get("norm_after", False)),
        norm_eps=cfg.get("layer_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096))
    names = {(3584, 28): "molmo-7b-d", (4096, 32): "molmo-7b-o", (8192, 80): "molmo-72b"}
    # The vision tower, pooling and projector are hard-coded (spec §1.3); projector width = LLM
    # SwiGLU width.
    return MolmoConfig(text=text, projector_hidden=hidden, family="dense",
                       name=names.get((d_model, text.n_layers), "custom"))


def load_config(path: str | pathlib.Path) -> MolmoConfig:
    path = pathlib.Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_hf_config(cfg, source=str(path))
