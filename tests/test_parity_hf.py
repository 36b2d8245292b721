"""Parity with implementations nobody here wrote: transformers' OLMoE, Qwen2, OLMo-2 and CLIP.

Weights of a tiny random transformers model are written into the *official Molmo key layout* by
hand, following spec §2 (independently of molmoe's adapter), then loaded with `molmoe.load`, so
the adapter, the loader and the model are all under test. fp32, logits within 1e-4 relative.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import molmoe  # noqa: E402
from molmoe.checkpoint.adapter import to_official  # noqa: E402
from tests.tiny import random_model, write_checkpoint  # noqa: E402

REL_TOL = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomize(module, std=0.1):
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return module.eval()


def _rope(theta):
    return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def _text_ids(config, batch=2, length=23):
    return torch.randint(0, config.text.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(7))


def _load_official(tmp_path, ours, official, layout):
    """Write `official` (a full official-layout state dict) as a checkpoint of `layout`."""
    directory = write_checkpoint(ours, tmp_path / "ckpt", layout)
    if layout == "dense":
        from safetensors.torch import save_file
        import json

        for f in directory.glob("model-*.safetensors"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in official.items()},
                  str(directory / "model-00001-of-00001.safetensors"))
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: "model-00001-of-00001.safetensors" for k in official}}))
    else:
        torch.save(official, directory / "pytorch_model.bin")
    return molmoe.load(directory)


def _olmoe_pair(tmp_path, top_k=None):
    """(molmoe model loaded from an official MolmoE .bin built from OLMoE weights, the OLMoE)."""
    ours = random_model("tiny-molmoe", top_k=top_k)
    t = ours.config.text
    hf_cfg = transformers.OlmoeConfig(
        vocab_size=t.embedding_size, hidden_size=t.d_model, intermediate_size=t.moe.expert_hidden,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, num_experts=t.moe.num_experts,
        num_experts_per_tok=t.moe.top_k, norm_topk_prob=False, rms_norm_eps=t.norm_eps,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **_rope(t.rope_theta))
    hf = _randomize(transformers.OlmoeForCausalLM(hf_cfg))
    sd = hf.state_dict()
    # Official MolmoE HF module tree (spec §2.3), built from the OLMoE weights by hand.
    official = to_official(ours.state_dict(), "molmoe-hf")  # vision + new_embedding rows
    official["model.transformer.wte.embedding"] = sd["model.embed_tokens.weight"]
    official["model.transformer.ln_f.weight"] = sd["model.norm.weight"]
    official["lm_head.weight"] = sd["lm_head.weight"]
    F_ = t.moe.expert_hidden
    for n in range(t.n_layers):
        hp, mp = f"model.layers.{n}.", f"model.transformer.blocks.{n}."
        official[mp + "attn.att_proj.weight"] = torch.cat(
            [sd[hp + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        official[mp + "attn.attn_out.weight"] = sd[hp + "self_attn.o_proj.weight"]
        official[mp + "attn.q_norm.weight"] = sd[hp + "self_attn.q_norm.weight"]
        official[mp + "attn.k_norm.weight"] = sd[hp + "self_attn.k_norm.weight"]
        official[mp + "attn.attn_norm.weight"] = sd[hp + "input_layernorm.weight"]
        official[mp + "mlp.ff_norm.weight"] = sd[hp + "post_attention_layernorm.weight"]
        official[mp + "mlp.gate.weight"] = sd[hp + "mlp.gate.weight"]
        gate_up = sd[hp + "mlp.experts.gate_up_proj"]  # (E, 2F, D): [gate; up]
        down = sd[hp + "mlp.experts.down_proj"]  # (E, D, F)
        for e in range(t.moe.num_experts):
            official[mp + f"mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :F_].clone()
            official[mp + f"mlp.experts.{e}.up_proj.weight"] = gate_up[e, F_:].clone()
            official[mp + f"mlp.experts.{e}.down_proj.weight"] = down[e].clone()
    return _load_official(tmp_path, ours, official, "molmoe-hf"), hf


def test_moe_decoder_matches_transformers_olmoe(tmp_path):
    model, hf = _olmoe_pair(tmp_path)
    ids = _text_ids(model.config)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < REL_TOL


def _dense_official(ours, sd, *, norm_after):
    t = ours.config.text
    official = to_official(ours.state_dict(), "dense")
    official["model.transformer.wte.embedding"] = sd["model.embed_tokens.weight"]
    official["model.transformer.ln_f.weight"] = sd["model.norm.weight"]
    official["model.transformer.ff_out.weight"] = sd["lm_head.weight"]
    for n in range(t.n_layers):
        hp, mp = f"model.layers.{n}.", f"model.transformer.blocks.{n}."
        official[mp + "att_proj.weight"] = torch.cat(
            [sd[hp + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        if t.qkv_bias:
            official[mp + "att_proj.bias"] = torch.cat(
                [sd[hp + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        official[mp + "attn_out.weight"] = sd[hp + "self_attn.o_proj.weight"]
        if t.qk_norm:
            official[mp + "q_norm.weight"] = sd[hp + "self_attn.q_norm.weight"]
            official[mp + "k_norm.weight"] = sd[hp + "self_attn.k_norm.weight"]
        # 7B-O: attn_norm <- post_attention_layernorm, ff_norm <- post_feedforward_layernorm
        official[mp + "attn_norm.weight"] = sd[hp + ("post_attention_layernorm.weight" if norm_after
                                                     else "input_layernorm.weight")]
        official[mp + "ff_norm.weight"] = sd[hp + ("post_feedforward_layernorm.weight" if norm_after
                                                   else "post_attention_layernorm.weight")]
        # ff_proj = cat(up, gate) (spec §2.2)
        official[mp + "ff_proj.weight"] = torch.cat([sd[hp + "mlp.up_proj.weight"],
                                                     sd[hp + "mlp.gate_proj.weight"]])
        official[mp + "ff_out.weight"] = sd[hp + "mlp.down_proj.weight"]
    return official


def _qwen2_pair(tmp_path):
    ours = random_model("tiny-7b-d")
    t = ours.config.text
    assert t.n_kv_heads < t.n_heads and t.qkv_bias  # GQA and qkv bias are exercised
    hf_cfg = transformers.Qwen2Config(
        vocab_size=t.embedding_size, hidden_size=t.d_model, intermediate_size=t.ffn_hidden,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, rms_norm_eps=t.norm_eps,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        use_sliding_window=False, **_rope(t.rope_theta))
    hf = _randomize(transformers.Qwen2ForCausalLM(hf_cfg))
    return _load_official(tmp_path, ours, _dense_official(ours, hf.state_dict(), norm_after=False),
                          "dense"), hf


def test_qwen2_decoder_matches_transformers_qwen2(tmp_path):
    model, hf = _qwen2_pair(tmp_path)
    ids = _text_ids(model.config)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < REL_TOL


def _olmo2_pair(tmp_path):
    ours = random_model("tiny-7b-o")
    t = ours.config.text
    hf_cfg = transformers.Olmo2Config(
        vocab_size=t.embedding_size, hidden_size=t.d_model, intermediate_size=t.ffn_hidden,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, rms_norm_eps=t.norm_eps,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **_rope(t.rope_theta))
    hf = _randomize(transformers.Olmo2ForCausalLM(hf_cfg))
    return _load_official(tmp_path, ours, _dense_official(ours, hf.state_dict(), norm_after=True),
                          "dense"), hf


def test_olmo_7b_o_decoder_matches_transformers_olmo2(tmp_path):
    model, hf = _olmo2_pair(tmp_path)
    ids = _text_ids(model.config)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < REL_TOL


@pytest.mark.parametrize("family", ["olmoe", "qwen2", "olmo2"])
def test_bf16_error_is_pytorch_bf16_error(tmp_path, family):
    """Pure bf16 (weights and activations) against fp32, measured against transformers' own
    bf16 error on the same weights: molmoe's bf16 path may not lose more than PyTorch's
    low-precision arithmetic does in an implementation nobody here wrote. (MoE: top-k = all
    experts, so bf16 noise cannot flip a routing decision; what is measured is arithmetic.)"""
    if family == "olmoe":
        model, hf = _olmoe_pair(tmp_path, top_k=8)
    else:
        model, hf = {"qwen2": _qwen2_pair, "olmo2": _olmo2_pair}[family](tmp_path)
    # Long enough that positions (RoPE angles up to ~300 rad) need the fp32 tables.
    ids = _text_ids(model.config, batch=1, length=300)
    with torch.no_grad():
        exact = hf(ids).logits
        assert rel_err(model(ids), exact) < REL_TOL
        ours_bf16 = model.to(torch.bfloat16)(ids).float()
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
    ours_err, hf_err = rel_err(ours_bf16, exact), rel_err(hf_bf16, exact)
    assert 0 < hf_err < 0.05, hf_err  # bf16 really ran and stayed sane
    assert ours_err <= 2 * hf_err, (ours_err, hf_err)


def test_padded_batch_matches_transformers_with_attention_mask(tmp_path):
    """Right padding (-1 ids, the official collator's convention) against HF's attention mask."""
    ours = random_model("tiny-7b-d")
    t = ours.config.text
    hf_cfg = transformers.Qwen2Config(
        vocab_size=t.embedding_size, hidden_size=t.d_model, intermediate_size=t.ffn_hidden,
        num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads, rms_norm_eps=t.norm_eps, tie_word_embeddings=False,
        **_rope(t.rope_theta))
    hf = _randomize(transformers.Qwen2ForCausalLM(hf_cfg))
    model = _load_official(tmp_path, ours, _dense_official(ours, hf.state_dict(), norm_after=False),
                           "dense")
    ids = _text_ids(ours.config)
    ids[1, 15:] = -1
    mask = ids != -1
    with torch.no_grad():
        ours_logits = model(ids)
        hf_logits = hf(ids.clamp(min=0), attention_mask=mask.long()).logits
    assert rel_err(ours_logits[mask], hf_logits[mask]) < REL_TOL


def test_vit_matches_transformers_clip(tmp_path):
    ours = random_model("tiny-molmoe")
    v = ours.config.vision
    hf_cfg = transformers.CLIPVisionConfig(
        hidden_size=v.emb_dim, intermediate_size=v.mlp_dim, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="quick_gelu", layer_norm_eps=v.norm_eps)
    hf = _randomize(transformers.CLIPVisionModel(hf_cfg))
    sd = hf.state_dict()
    # CLIP -> official Molmo ViT keys (spec §2.2, convert_state_dict_clip)
    official = to_official(ours.state_dict(), "molmoe-hf")
    vit = "model.vision_backbone.image_vit."
    cp = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    official[vit + "class_embedding"] = sd[cp + "embeddings.class_embedding"]
    official[vit + "positional_embedding"] = sd[cp + "embeddings.position_embedding.weight"]
    official[vit + "patch_embedding.weight"] = (
        sd[cp + "embeddings.patch_embedding.weight"].permute(0, 2, 3, 1).reshape(v.emb_dim, -1))
    for a, b in (("weight", "weight"), ("bias", "bias")):
        official[vit + f"pre_ln.{a}"] = sd[cp + f"pre_layrnorm.{b}"]
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.out_proj",
             "attention_norm": "layer_norm1", "ffn_norm": "layer_norm2",
             "feed_forward.w1": "mlp.fc1", "feed_forward.w2": "mlp.fc2"}
    for L in range(v.num_layers):
        for ours_name, clip_name in names.items():
            for p in ("weight", "bias"):
                official[f"{vit}transformer.resblocks.{L}.{ours_name}.{p}"] = (
                    sd[f"{cp}encoder.layers.{L}.{clip_name}.{p}"])
    model = _load_official(tmp_path, ours, official, "molmoe-hf")
    pixels = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(3))
    # (N, 3, 336, 336) -> (N, 576, 588), each patch ordered (dy, dx, c) with c fastest (spec §4.4)
    g, p = v.grid, v.patch_size
    patches = pixels.reshape(3, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(3, g * g, -1)
    with torch.no_grad():
        ours_hidden = model.vision.image_vit(patches)
        hf_hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours_hidden) == v.num_layers
    for b in range(v.num_layers):  # our block b output == CLIP hidden_states[b + 1] (spec §1.3)
        assert rel_err(ours_hidden[b], hf_hidden[b + 1]) < REL_TOL, b
