"""The training objective: answer-token cross-entropy plus MolmoE's router losses.

`training_loss(model, inputs, loss_mask)` runs the model's forward with gradients and returns
the total loss and each part separately, for logging:

    ce     mean cross-entropy of the next token over the positions `loss_mask` marks as answer
           tokens (prompt, image and padding positions are left out); the logits at position i
           predict the token at i + 1, as in every causal LM
    lb     the load-balancing loss E * sum_e f_e P_e (Switch / OLMoE; f_e = share of the layer's
           assignments on expert e, P_e = its mean router probability), summed over MoE layers
    z      the router z-loss mean_t logsumexp(logits_t)^2 (ST-MoE), summed over MoE layers
    total  ce + lb_coef * lb + z_coef * z, with OLMoE's coefficients 0.01 and 0.001 by default

Both backends compute the router losses in their MoE op whenever a gradient is needed (the
reference: the released per-expert loop; Triton: the grouped kernels' router backward), so this
module only gathers them. Dense models (7B-D, 7B-O) have no router: lb and z are 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from molmoe.errors import UsageError

LB_COEF = 0.01  # OLMoE's load-balancing coefficient
Z_COEF = 0.001  # OLMoE's router z-loss coefficient


@dataclass
class TrainingLoss:
    total: torch.Tensor  # what to backpropagate
    ce: torch.Tensor
    lb: torch.Tensor
    z: torch.Tensor
    tokens: int  # answer tokens the cross-entropy averages over

    def as_dict(self) -> dict:
        return {"loss": float(self.total), "ce": float(self.ce), "lb": float(self.lb),
                "z": float(self.z), "tokens": self.tokens}


def moe_layers(model) -> list:
    return [b.ffn for b in model.decoder.blocks if hasattr(b.ffn, "router")]


def training_loss(model, inputs: dict, loss_mask_BS: torch.Tensor, *, lb_coef: float = LB_COEF,
                  z_coef: float = Z_COEF, ce_tokens: int | None = None) -> TrainingLoss:
    """inputs: the model's forward arguments (batched: input_ids (B, S), optional images,
    image_masks, image_input_idx, crop_valid; -1 pads); loss_mask_BS: bool (B, S), True where
    the token is an answer token to predict. See the module docstring.

    ce_tokens: divide the summed cross-entropy by this count instead of this batch's answer
    tokens. A trainer that splits one global batch into micro-batches (and ranks) passes the
    global batch's answer-token count, so the summed gradients equal those of the whole batch."""
    ids_BS = inputs["input_ids"]
    if ids_BS.dim() != 2 or loss_mask_BS.shape != ids_BS.shape or loss_mask_BS.dtype != torch.bool:
        raise UsageError(f"loss_mask must be a bool tensor shaped like input_ids (B, S) = "
                         f"{tuple(ids_BS.shape)}, got {loss_mask_BS.dtype} "
                         f"{tuple(loss_mask_BS.shape)}")
    targets_BS = ids_BS[:, 1:]
    mask_BS = loss_mask_BS[:, 1:]
    vocab = model.config.text.embedding_size  # the LM head's rows
    bad = mask_BS & ((targets_BS < 0) | (targets_BS >= vocab))
    if bad.any():
        raise UsageError(f"loss_mask marks a token the LM head cannot produce (ids 0..{vocab - 1}"
                         f"): {int(targets_BS[bad][0])}; mask image, padding and special tokens")
    tokens = int(mask_BS.sum())
    layers = moe_layers(model)
    for layer in layers:
        layer.aux = None
    logits_BSV = model(**inputs)
    nll = F.cross_entropy(logits_BSV[:, :-1].float().flatten(0, 1),
                          targets_BS.clamp(min=0).flatten(), reduction="none")
    if ce_tokens is not None and (not isinstance(ce_tokens, int) or ce_tokens < 1):
        raise UsageError(f"ce_tokens must be a positive int, got {ce_tokens!r}")
    ce = (nll * mask_BS.flatten()).sum() / (ce_tokens or max(tokens, 1))
    zero = ce.new_zeros(())
    lb = z = zero
    for layer in layers:
        if layer.aux is None:
            raise UsageError("the MoE layers computed no router losses: the forward needs "
                             "gradients (torch.enable_grad() and trainable parameters)")
        lb = lb + layer.aux["lb_loss"].float()
        z = z + layer.aux["z_loss"].float()
    return TrainingLoss(ce + lb_coef * lb + z_coef * z, ce, lb, z, tokens)
