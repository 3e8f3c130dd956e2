"""The optimizer a run steps: SGD or AdamW over the trainable parameters, with MMDetection's
bias rules (FCOS: biases at 2x lr, no weight decay)."""

from __future__ import annotations

import torch
from torch import nn

from crosskd_cli.config.presets import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters; biases of convs and linears (not norms) get
    `bias_lr_factor` x lr and `bias_decay_factor` x weight decay, as MMDetection's
    `paramwise_cfg` (bias_lr_mult / bias_decay_mult) does for FCOS."""
    biases = {
        id(module.bias)
        for module in model.modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in biases]}]
    special = [p for p in trainable if id(p) in biases]
    if special and (cfg.bias_lr_factor != 1.0 or cfg.bias_decay_factor != 1.0):
        groups.append(
            {
                "params": special,
                "lr": lr * cfg.bias_lr_factor,
                "weight_decay": cfg.weight_decay * cfg.bias_decay_factor,
            }
        )
    else:
        groups[0]["params"] += special
    # fused: one kernel per step, and it honours `found_inf` (NonFiniteGuard) on the device
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True
    )
