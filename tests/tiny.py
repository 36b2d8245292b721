"""Tiny random Molmo checkpoints written in the official layouts, for tests."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from molmoe.checkpoint.adapter import to_official
from molmoe.config import MolmoConfig, preset
from molmoe.model import Molmo


def random_model(name: str, seed: int = 0, std: float = 0.1, top_k: int | None = None,
                 image_size: int | None = None) -> Molmo:
    """A preset's model with random weights; `top_k` overrides the MoE's experts per token,
    `image_size` the ViT's crop side (fewer patches: the Triton interpreter's ViT is slow)."""
    torch.manual_seed(seed)
    config = preset(name)
    if image_size is not None:
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    if top_k is not None:
        text = dataclasses.replace(config.text, moe=dataclasses.replace(config.text.moe, top_k=top_k))
        config = config.replace(text=text)
    model = Molmo(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("_ln.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def official_config(config: MolmoConfig) -> dict:
    """A config.json in the official format of the model's family (spec §1.2)."""
    t, v = config.text, config.vision
    if config.family == "molmoe":
        return {
            "model_type": "molmo", "architectures": ["OLMoForCausalLM"], "d_model": t.d_model,
            "n_layers": t.n_layers, "n_heads": t.n_heads, "n_kv_heads": None,
            "mlp_ratio": 2 * t.ffn_hidden // t.d_model, "mlp_hidden_size": 2 * t.ffn_hidden,
            "block_type": "moe", "moe_num_experts": t.moe.num_experts, "moe_top_k": t.moe.top_k,
            "vocab_size": t.vocab_size, "embedding_size": t.embedding_size,
            "additional_vocab_size": t.additional_vocab_size, "qkv_bias": t.qkv_bias,
            "attention_layer_norm": t.qk_norm, "norm_after": t.norm_after,
            "layer_norm_eps": t.norm_eps, "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings, "vit_layers": list(v.vit_layers),
            "image_pooling_h": 2, "image_pooling_w": 2,
            "vision_backbone": {"image_default_input_size": [v.image_size, v.image_size],
                                "image_patch_size": v.patch_size, "image_emb_dim": v.emb_dim,
                                "image_num_heads": v.num_heads, "image_num_layers": v.num_layers,
                                "image_mlp_dim": v.mlp_dim, "image_norm_eps": v.norm_eps},
        }
    raise ValueError("dense official configs hard-code the vision tower; use molmoe_config_for")


def write_checkpoint(model: Molmo, directory: pathlib.Path, layout: str) -> pathlib.Path:
    """Write `model` in an official layout: dense = sharded safetensors + index; MolmoE = .bin."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = to_official(model.state_dict(), layout)
    config = model.config
    if layout == "dense":
        keys = sorted(state)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:]), 1):
            name = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: state[k].contiguous() for k in part}, str(directory / name))
            weight_map.update({k: name for k in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
        # Dense config.json only has HF fields; the tiny ViT is not expressible there, so the
        # test config carries molmoe's own block (the real 7B configs parse via presets).
        raw = {"model_type": "molmo", "molmoe": config.to_dict()}
    else:
        torch.save(state, directory / "pytorch_model.bin")
        raw = official_config(config)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def random_inputs(config: MolmoConfig, *, batch: int = 1, crops: int = 2, text: int = 12,
                  seed: int = 1):
    """Token ids with image tokens at the start, images, masks and indices as the processor lays
    them out (global view first, -100 for dropped cells, the trailing -1 mask row)."""
    g = torch.Generator().manual_seed(seed)
    tpc = config.vision.tokens_per_crop
    n_img = crops * tpc
    S = 1 + n_img + text
    ids = torch.randint(0, config.text.vocab_size, (batch, S), generator=g)
    images = torch.randn(batch, crops, config.vision.num_patches, config.vision.patch_dim,
                         generator=g)
    masks = torch.rand(batch, crops, config.vision.num_patches, generator=g)
    masks[:, :, :10] = 0.0
    masks[:, :, 10:20] = 1.0
    masks[:, -1] = -1.0
    idx = (1 + torch.arange(n_img)).view(crops, tpc).expand(batch, -1, -1).clone()
    idx[:, 1:, :5] = -100
    return ids, images, masks, idx.to(torch.int32)


def scripted_model(script: list[int], eos: int, seed: int = 2) -> Molmo:
    """tiny-molmoe whose greedy answer is `script` then `eos`: every block's output is zeroed, so
    the last position's logits depend on the last token alone, and the embeddings and LM head
    form a transition table t_0 -> t_1 -> ... -> EOS (t_0: any token outside the script). The
    ids of `script` must be distinct and differ from `eos`."""
    assert len(set(script)) == len(script) and eos not in script
    model = random_model("tiny-molmoe", seed=seed)
    dec = model.decoder
    with torch.no_grad():
        for block in dec.blocks:
            block.attn.out.weight.zero_()
            block.ffn.w_down.zero_()
        D = dec.embed.embedding.shape[1]
        onehot = torch.eye(D)
        dec.embed.embedding.copy_(onehot[0].expand_as(dec.embed.embedding))
        dec.embed.new_embedding.copy_(onehot[0].expand_as(dec.embed.new_embedding))
        dec.norm.weight.fill_(1.0)
        dec.lm_head.weight.zero_()
        for i, t in enumerate(script + [eos]):
            if i < len(script):
                dec.embed.embedding[t] = onehot[i + 1]
            dec.lm_head.weight[t] = 10.0 * onehot[i]
    return model
