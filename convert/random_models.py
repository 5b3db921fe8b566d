"""Random-init torchvision models with randomised BatchNorm statistics, for parity checks without downloads.

A freshly built torchvision model has running_mean = 0 and running_var = 1 everywhere, which hides
any mistake in how statistics are used. Here every BN gets random affine parameters and running
statistics taken from a real batch (so activations stay of order one through deep networks) and
then perturbed, so that eval mode and train mode compute different things.

The last BN of each residual branch gets a small scale (0.1 to 0.3), as trained networks have and
as torchvision's zero_init_residual takes to its limit. With unit scales a randomly initialised
BatchNorm network is chaotic in train mode (arXiv:1902.08129): every block amplifies rounding
error by a few percent, so that torch's own float32 logits of a ResNet-152 differ from its
float64 logits by 3e-4, and a float32 comparison would measure that, not the conversion.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _residual_branch_ends(model: torch.nn.Module) -> set[int]:
    """ids of the last BN of each residual branch (ResNet's bn2 / bn3, the projection BN of EfficientNet's and
    MobileNet's inverted residuals, RegNet's f.c.1)."""
    ends = set()
    for module in model.modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            ends.add(id(module.bn3))
        elif isinstance(module, torchvision.models.resnet.BasicBlock):
            ends.add(id(module.bn2))
        elif isinstance(module, (torchvision.models.efficientnet.MBConv, torchvision.models.efficientnet.FusedMBConv)):
            if module.use_res_connect:
                ends.add(id(module.block[-1][1]))  # the projection's BatchNorm
        elif isinstance(module, torchvision.models.mobilenetv2.InvertedResidual):
            if module.use_res_connect:
                ends.add(id(module.conv[-1]))  # the projection's BatchNorm
        elif isinstance(module, torchvision.models.mobilenetv3.InvertedResidual):
            if module.use_res_connect:
                ends.add(id(module.block[-1][1]))
        elif isinstance(module, torchvision.models.regnet.ResBottleneckBlock):
            ends.add(id(module.f.c[1]))  # every RegNet block is residual: f's last 1x1 conv's BatchNorm
    return ends


def _randomize_swin(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Swin's zero-init biases (V2's key bias too, which V2 ignores), a relative position bias table and V2's
    logit scales (some beyond the log(100) clamp) as trained models have them; V2's post-norm LayerNorms, the
    ends of its residual branches, with the small scales of BatchNorm branch ends."""
    swin = torchvision.models.swin_transformer
    for module in model.modules():
        if isinstance(module, swin.SwinTransformerBlock):
            for linear in (module.attn.qkv, module.attn.proj, module.mlp[0], module.mlp[3]):
                linear.bias.uniform_(-0.1, 0.1, generator=generator)
            if isinstance(module, swin.SwinTransformerBlockV2):
                module.attn.logit_scale.uniform_(1.5, 5.0, generator=generator)
                module.attn.cpb_mlp[0].bias.uniform_(-0.5, 0.5, generator=generator)
                for norm in (module.norm1, module.norm2):
                    norm.weight.uniform_(0.1, 0.3, generator=generator)
            else:
                module.attn.relative_position_bias_table.normal_(0.0, 0.5, generator=generator)


def _randomize_vit(model: torch.nn.Module, generator: torch.Generator) -> None:
    """ViT's zero-init class token, attention biases and head, and its MLP biases (N(0, 1e-6)), as trained models
    have them: otherwise every one of them passes zeros through, and the head's zeros give zero logits."""
    if not isinstance(model, torchvision.models.VisionTransformer):
        return
    model.class_token.normal_(0.0, 0.5, generator=generator)
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.in_proj_bias.uniform_(-0.1, 0.1, generator=generator)
            module.out_proj.bias.uniform_(-0.1, 0.1, generator=generator)
        elif isinstance(module, torchvision.models.vision_transformer.MLPBlock):
            for linear in (module[0], module[3]):
                linear.bias.uniform_(-0.1, 0.1, generator=generator)
    bound = model.heads.head.in_features**-0.5  # nn.Linear's default init
    for param in (model.heads.head.weight, model.heads.head.bias):
        param.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def randomized_torchvision_model(
    arch: str,
    *,
    num_classes: int = 10,
    seed: int = 0,
    calibration_shape: tuple[int, int] = (64, 64),
    **options: Any,
) -> torch.nn.Module:
    """torchvision's ``arch`` with random weights and randomised BN affine parameters and statistics.

    Args:
        arch: a torchvision builder name, e.g. ``"resnet50"``.
        num_classes: head width.
        seed: seeds torch's generator; the same seed gives the same model.
        calibration_shape: (H, W) of the random batch the running statistics are taken from; a ViT's is its
            ``image_size`` (the only size it takes).
        options: further arguments of the torchvision builder (a ViT's ``image_size``).

    Returns:
        The model in eval mode, float32, on CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
    norms = _batch_norms(model)
    branch_ends = _residual_branch_ends(model)
    for bn in norms:
        low, high = (0.1, 0.3) if id(bn) in branch_ends else (0.6, 1.4)
        bn.weight.copy_(torch.empty_like(bn.weight).uniform_(low, high, generator=generator))
        bn.bias.copy_(torch.empty_like(bn.bias).uniform_(-0.3, 0.3, generator=generator))
    # LayerNorms (ConvNeXt's LayerNorm2d included) get non-trivial affine parameters, as BatchNorms do; ConvNeXt's
    # layer_scale (1e-6 at init: every block an identity) the small scales of the residual branch ends.
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
            module.weight.copy_(torch.empty_like(module.weight).uniform_(0.6, 1.4, generator=generator))
            module.bias.copy_(torch.empty_like(module.bias).uniform_(-0.3, 0.3, generator=generator))
        elif isinstance(module, torchvision.models.convnext.CNBlock):
            module.layer_scale.copy_(torch.empty_like(module.layer_scale).uniform_(0.1, 0.3, generator=generator))
    _randomize_swin(model, generator)
    _randomize_vit(model, generator)
    if isinstance(model, torchvision.models.VisionTransformer):
        calibration_shape = (model.image_size, model.image_size)
    # Running statistics from a real batch: momentum 1 makes one train-mode forward copy them in.
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.momentum = 1.0
    model.train()
    calibration = torch.randn(8, 3, *calibration_shape, generator=generator)
    if norms:
        model(calibration)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
        std = bn.running_var.sqrt()
        bn.running_mean.add_(0.2 * std * torch.randn(bn.running_mean.shape, generator=generator))
        bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4, generator=generator))
        bn.num_batches_tracked.zero_()
    # Logits of order one, as a trained head gives: torchvision's EfficientNet head init with few
    # classes makes them of order a hundred, where float32 rounding alone exceeds 1e-4.
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    logits_std = model.eval()(calibration).std()
    head.weight.div_(logits_std)
    head.bias.div_(logits_std)
    return model
