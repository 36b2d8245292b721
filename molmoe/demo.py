"""The built-in demo checkpoint: a tiny MolmoE with RANDOM weights, in the official layout.

It exists so the whole path (preprocess, ViT, pooling, decoder, generation, pointing, drawing) runs
on a fresh machine with no downloads. It is built deterministically on first use: a MolmoE-format
`config.json`, a `pytorch_model.bin` in the released HF key layout, a byte-level tokenizer whose
special tokens follow MolmoE's order, and MolmoE's processor settings. Its answers are noise.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import torch

from molmoe.errors import UsageError

DEMO_VERSION = "demo-v1"
ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_PROMPT = "Point to the red circle."

# Same order as MolmoE's tokenizer (spec §5.1): EOS/BOS, padding, then the 5 image tokens.
_SPECIALS = ["<|endoftext|>", "<|padding|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>",
             "<|image|>"]

_CONFIG = {
    "model_type": "molmo", "architectures": ["OLMoForCausalLM"],
    "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": None, "mlp_ratio": 1,
    "mlp_hidden_size": 64, "block_type": "moe", "moe_num_experts": 8, "moe_top_k": 2,
    "vocab_size": 256 + len(_SPECIALS), "embedding_size": 320, "additional_vocab_size": 128,
    "qkv_bias": False, "attention_layer_norm": True, "norm_after": False, "layer_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 4096, "vit_layers": [-1, -3],
    "image_pooling_h": 2, "image_pooling_w": 2,
    "vision_backbone": {"image_default_input_size": [336, 336], "image_patch_size": 14,
                        "image_emb_dim": 32, "image_num_heads": 2, "image_num_layers": 3,
                        "image_mlp_dim": 64, "image_norm_eps": 1e-5},
}
_PREPROCESSOR = {
    "base_image_input_size": [336, 336], "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "image_padding_mask": True,
    "image_patch_size": 14, "image_processor_type": "MolmoImageProcessor",
    "image_token_length_h": 12, "image_token_length_w": 12, "max_crops": 12,
    "overlap_margins": [4, 4], "processor_class": "MolmoProcessor",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    return tok.to_str()


def _write(directory: pathlib.Path, seed: int) -> None:
    write_tiny_checkpoint(directory, seed=seed)


def write_tiny_checkpoint(directory: pathlib.Path, *, seed: int = 0, config: dict | None = None,
                          vision: dict | None = None, preprocessor: dict | None = None) -> None:
    """A tiny MolmoE checkpoint with random weights into the existing `directory`: the demo's
    config.json, tokenizer and processor files, with `config`, `vision` (the vision_backbone
    entries) and `preprocessor` overriding single keys (e.g. a smaller crop geometry for
    training tests: base_image_input_size [112, 112], image_token_length_h/w 4)."""
    from molmoe.checkpoint.adapter import to_official
    from molmoe.config import from_hf_config
    from molmoe.model import Molmo

    raw = {**_CONFIG, **(config or {})}
    raw["vision_backbone"] = {**_CONFIG["vision_backbone"], **(vision or {})}
    pre = {**_PREPROCESSOR, **(preprocessor or {})}
    config = from_hf_config(raw)
    torch.manual_seed(seed)
    model = Molmo(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("pre_ln.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    torch.save(to_official(model.state_dict(), "molmoe-hf"), directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (directory / "tokenizer.json").write_text(build_tokenizer_json())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
         "add_bos_token": False, "add_eos_token": False}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 256, "pad_token_id": 257}, indent=2))
    (directory / "README.md").write_text("molmoe demo checkpoint: tiny MolmoE, RANDOM weights.\n")


def demo_checkpoint(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> pathlib.Path:
    """Path of the demo checkpoint, built (atomically) on first use."""
    root = pathlib.Path(cache_dir or os.environ.get("MOLMOE_CACHE")
                        or pathlib.Path.home() / ".cache" / "molmoe")
    target = root / f"{DEMO_VERSION}-seed{seed}"
    if (target / "config.json").exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    except OSError as e:
        raise UsageError(f"demo cache directory {root}: cannot create the checkpoint there "
                         f"({e.strerror or e}); choose another (--cache-dir or MOLMOE_CACHE)"
                         ) from None
    try:
        _write(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # built concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
