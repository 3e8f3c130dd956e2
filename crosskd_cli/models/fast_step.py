"""How the training step runs fast: the frozen teacher with its BatchNorms folded, and
channels-last activations and weights on CPUs.

None changes a weight that is saved, evaluated or exported: the folded teacher is what the
distiller runs (the teacher's file is untouched, the module it was given is folded in place),
channels-last is a memory layout (saved and evaluated in the standard one). Both change
float rounding (a folded convolution and a channels-last kernel add in another order):
`tests/test_runtime.py` bounds the difference.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# (conv, norm) attribute pairs of torchvision's ResNet stem and blocks
_NAMED_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def channels_last_pays(device: torch.device) -> bool:
    """oneDNN's CPU convolutions run 15-25% faster on NHWC activations (1x1 convolutions up
    to 4x); on GPUs the fp32 default is kept as it was (not measured here)."""
    return device.type == "cpu"


def step_layout(images: Tensor) -> Tensor:
    """The step's input batch in the layout its convolutions run fastest in on this device;
    every activation after it keeps that layout."""
    if channels_last_pays(images.device) and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def to_train_layout(model: nn.Module, device: torch.device) -> bool:
    """Store the weights of a model about to train channels-last, in place, where that pays
    on `device`: fed NHWC activations, a convolution with NCHW weights reorders them at every
    call, forward and backward, on every FPN level (the student step runs ~9% faster without
    that on a 2-core CPU). Saving is unaffected: Accelerate's state and `save_checkpoint`
    write contiguous copies. Returns whether the layout changed."""
    if not channels_last_pays(device):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def standard_layout(model: nn.Module) -> nn.Module:
    """`model` as `crosskd eval` loads it from its file (NCHW weights): itself when it is
    so, else a copy without gradients. Evaluation during training runs this, so the AP a run
    records is the AP its checkpoint gives, to the last digit."""
    if all(p.is_contiguous() for p in model.parameters()):
        return model
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for param in plain.parameters():
        param.grad = None
    return plain


def _frozen_norm(norm: nn.Module) -> bool:
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.track_running_stats
        and not any(p.requires_grad for p in norm.parameters())
    )


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and not conv.training
        and not any(p.requires_grad for p in conv.parameters())
        and _frozen_norm(norm)
    )


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every frozen eval-mode BatchNorm into the convolution before it, in place; the
    norm becomes an Identity. Pairs: torchvision ResNet's conv{k}/bn{k} and downsample, and
    a BatchNorm right after a Conv2d in an nn.Sequential (MobileNetV2's ConvNormActivation).
    Returns the number of pairs folded. Only for a model that never trains again."""
    folded = 0
    for module in list(model.modules()):
        for conv_name, norm_name in _NAMED_PAIRS:
            conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
            if conv is not None and norm is not None and _foldable(conv, norm):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm).requires_grad_(False))
                setattr(module, norm_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module)
            for k in range(len(children) - 1):
                if _foldable(children[k], children[k + 1]):
                    module[k] = fuse_conv_bn_eval(children[k], children[k + 1]).requires_grad_(
                        False
                    )
                    module[k + 1] = nn.Identity()
                    folded += 1
    return folded


def runtime_teacher(teacher: nn.Module, *, in_place: bool = False) -> nn.Module:
    """The frozen teacher as a training step runs it: its BatchNorms folded into its
    convolutions and, where channels-last pays, its weights stored channels-last too (a
    convolution given NHWC activations and NCHW weights reorders the weights at every call,
    forward and backward, on every FPN level). It is never saved.

    A copy, the teacher given left as it is (its state dict, its evaluation); or, with
    `in_place`, that teacher itself changed layer by layer, for a caller done with the
    original: one teacher in memory instead of two (~125 MB for a GFL R50 in fp32, and a
    whole-model copy freed after the models are built stays in the heap of the process)."""
    fast = teacher if in_place else copy.deepcopy(teacher)
    fold_frozen_batchnorm(fast)
    first = next(fast.parameters(), None)
    if first is not None and channels_last_pays(first.device):
        fast.to(memory_format=torch.channels_last)
    return fast


def with_conv_weights_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a frozen model whose convolution weights and biases are stored in `dtype`,
    sharing every other tensor with `model`. Under autocast to `dtype` it computes exactly
    what `model` does (autocast casts convolution weights to `dtype` anyway), without casting
    a frozen weight at every call: autocast caches only the casts of weights that train."""
    shared = {
        id(tensor): tensor
        for module in model.modules()
        if type(module) is not nn.Conv2d
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    }
    cast = copy.deepcopy(model, shared)
    for module in cast.modules():
        if type(module) is nn.Conv2d:
            for name, param in list(module.named_parameters(recurse=False)):
                fmt = (
                    torch.channels_last if param.dim() == 4 and not param.is_contiguous() else None
                )
                value = param.detach().to(dtype)
                if fmt is not None:
                    value = value.contiguous(memory_format=fmt)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    return cast
