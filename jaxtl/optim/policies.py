"""Built-in freezing and learning-rate policies, written as rule lists with the public Rule API.

Each policy is a function of the model (it reads ``model.blocks()``: stem, stages, head) that
returns ordered rules; ``assign(model, policy(model))`` turns them into groups. A policy of your
own is any function doing the same, e.g. training the head and every BatchNorm::

    def head_and_norms(model):
        return [Rule(f"{model.head_name}.*", group="head"),
                Rule("re:.*(bn\\d|downsample\\.1)\\..*", group="norms", lr_mult=0.1, bn="train"),
                Rule("*", group="frozen", frozen=True)]
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from jaxtl.models.layers import BatchNorm2d, LayerNorm
from jaxtl.models.names import dotted_name
from jaxtl.models.protocol import missing_members
from jaxtl.optim.groups import ParamGroupError, Rule

Policy = Callable[[nnx.Module], list[Rule]]


def _blocks(model: nnx.Module) -> list[tuple[str, tuple[str, ...]]]:
    # Only what every policy and training run reads (blocks(); head_name picks a run's cacheable
    # phases): the rest of the contract serves feature caching and conversion, which custom models
    # given to policies may not use.
    missing = missing_members(model, ("head_name", "blocks"))
    if missing:
        raise ParamGroupError(
            f"{type(model).__name__} lacks {', '.join(missing)} of the jaxtl.models.Classifier contract; "
            "built-in policies need its stem/stage/head structure"
        )
    return list(model.blocks())


def _prefix_rules(prefixes: tuple[str, ...], **settings) -> list[Rule]:
    return [Rule(f"{prefix}*", **settings) for prefix in prefixes]


def head_only(model: nnx.Module) -> list[Rule]:
    """Feature extraction: only the classifier head trains; the backbone is frozen, its BN in eval mode."""
    *backbone, (_, head) = _blocks(model)
    return [*_prefix_rules(head, group="head"), Rule("*", group="backbone", frozen=True)]


def last_n_blocks(n: int) -> Policy:
    """The head and the last ``n`` stages train (group ``blocks``); earlier stages and the stem are frozen."""
    if n < 0:
        raise ParamGroupError(f"last_n_blocks({n}): n must be >= 0")

    def policy(model: nnx.Module) -> list[Rule]:
        *backbone, (_, head) = _blocks(model)
        if n > len(backbone):
            raise ParamGroupError(f"last_n_blocks({n}): the model has {len(backbone)} blocks before its head")
        rules = _prefix_rules(head, group="head")
        for _, prefixes in backbone[len(backbone) - n :]:
            rules += _prefix_rules(prefixes, group="blocks")
        return rules + ([Rule("*", group="frozen", frozen=True)] if n < len(backbone) else [])

    policy.__name__ = f"last_n_blocks({n})"
    return policy


def full(backbone_lr_mult: float = 1.0) -> Policy:
    """Everything trains: groups ``head`` and ``backbone`` (the backbone's LR times ``backbone_lr_mult``)."""

    def policy(model: nnx.Module) -> list[Rule]:
        *_, (_, head) = _blocks(model)
        return [*_prefix_rules(head, group="head"), Rule("*", group="backbone", lr_mult=backbone_lr_mult)]

    policy.__name__ = f"full({backbone_lr_mult:g})"
    return policy


def discriminative(factor: float = 1 / 2.6) -> Policy:
    """Every block trains, the LR shrinking by ``factor`` per block from the head down (fastai's
    discriminative learning rates: the head at the base LR, the last stage at ``factor`` times it, ...)."""
    if not 0 < factor <= 1:
        raise ParamGroupError(f"discriminative({factor}): factor must be in (0, 1]")

    def policy(model: nnx.Module) -> list[Rule]:
        blocks = _blocks(model)
        rules = []
        for depth, (name, prefixes) in enumerate(reversed(blocks)):
            rules += _prefix_rules(prefixes, group=name, lr_mult=factor**depth)
        return rules

    policy.__name__ = f"discriminative({factor:g})"
    return policy


def layerwise_lr_decay(decay: float = 0.75) -> Policy:
    """Every residual block its own group, LR times ``decay`` per block from the head down (BEiT-style).

    Finer than :func:`discriminative`: within a stage, each block (``layer4.1``, ``layer4.0``,
    ``features.6.3`` ...) is a step.
    """
    if not 0 < decay <= 1:
        raise ParamGroupError(f"layerwise_lr_decay({decay}): decay must be in (0, 1]")

    def policy(model: nnx.Module) -> list[Rule]:
        from jaxtl.optim.groups import parameters

        names = list(parameters(model))
        units: list[tuple[str, tuple[str, ...]]] = []
        for block, (first, *extra) in _blocks(model):
            children = {n[len(first) :].split(".")[0] for n in names if n.startswith(first)}
            if block in ("stem", "head") or not (extra or all(c.isdigit() for c in children)):
                units.append((block, (first, *extra)))
                continue
            if all(c.isdigit() for c in children):
                # A stage: each of its residual blocks is a unit; a stage's extra module (EfficientNet's
                # final 1x1 conv) is one more unit after them.
                units += [(f"{first}{c}", (f"{first}{c}.",)) for c in sorted(children, key=int)]
                units += [(prefix.rstrip("."), (prefix,)) for prefix in extra]
            else:
                # A stage whose prefixes are its blocks (MobileNet's features.2., features.3.): one unit each.
                units += [(prefix.rstrip("."), (prefix,)) for prefix in (first, *extra)]
        rules = []
        for depth, (name, prefixes) in enumerate(reversed(units)):
            rules += _prefix_rules(prefixes, group=name, lr_mult=decay**depth)
        return rules

    policy.__name__ = f"layerwise_lr_decay({decay:g})"
    return policy


SURGICAL_BLOCKS = ("first", "middle", "last")


def surgical(block: str) -> Policy:
    """Surgical fine-tuning: the head and one block group train; the rest of the backbone is frozen.

    Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023 (arXiv:2210.11466):
    which block to tune depends on the shift, the first for input-level shifts (corruptions, a new sensor), a
    middle one for feature-level shifts, the last for output-level ones (new labels of the same images). The
    blocks are the model's stages (``blocks()`` without stem and head): ``first`` is the stem and the first stage,
    ``middle`` the stage at index ``(stages - 1) // 2`` (ResNet: ``layer2``; EfficientNet: ``features.4``),
    ``last`` the last stage. Group ``block`` holds the block; the new head (group ``head``) always trains, since
    the paper's models kept their trained classifier and a transferred one's is new.
    """
    if block not in SURGICAL_BLOCKS:
        raise ParamGroupError(f"surgical({block!r}): the block is one of {', '.join(SURGICAL_BLOCKS)}")

    def policy(model: nnx.Module) -> list[Rule]:
        (_, stem), *stages, (_, head) = _blocks(model)
        if not stages:
            raise ParamGroupError(f"surgical({block!r}): the model has no stage between its stem and head")
        chosen = {
            "first": (*stem, *stages[0][1]),
            "middle": stages[(len(stages) - 1) // 2][1],
            "last": stages[-1][1],
        }[block]
        rules = _prefix_rules(head, group="head") + _prefix_rules(chosen, group="block")
        return [*rules, Rule("*", group="frozen", frozen=True)]

    policy.__name__ = f"surgical({block})"
    return policy


def bitfit(model: nnx.Module) -> list[Rule]:
    """BitFit: the head and every bias train (BatchNorm biases in BN-only ResNets; the query, key and value biases of
    an attention's packed ``in_proj_bias``); the rest is frozen."""
    *_, (_, head) = _blocks(model)
    biases = Rule(r"re:.*[._]bias", group="biases")
    return [*_prefix_rules(head, group="head"), biases, Rule("*", group="frozen", frozen=True)]


def norm_only(model: nnx.Module) -> list[Rule]:
    """The head and every normalisation layer's weight and bias train (BatchNorm with batch statistics, LayerNorm);
    the rest is frozen."""
    *_, (_, head) = _blocks(model)
    modules = list(nnx.iter_modules(model))
    batch_norms = [dotted_name(p) for p, m in modules if isinstance(m, BatchNorm2d)]
    layer_norms = [dotted_name(p) for p, m in modules if isinstance(m, LayerNorm)]
    rules = _prefix_rules(head, group="head")
    rules += [Rule(f"{name}.*", group="norms", bn="train") for name in batch_norms]
    rules += [Rule(f"{name}.*", group="norms") for name in layer_norms]
    return rules + [Rule("*", group="frozen", frozen=True)]


POLICIES: dict[str, Callable[..., Policy] | Policy] = {
    "head_only": head_only,
    "last_n_blocks": last_n_blocks,
    "full": full,
    "discriminative": discriminative,
    "layerwise_lr_decay": layerwise_lr_decay,
    "surgical": surgical,
    "bitfit": bitfit,
    "norm_only": norm_only,
}
_PARAMETRIC = {
    "last_n_blocks": int,
    "full": float,
    "discriminative": float,
    "layerwise_lr_decay": float,
    "surgical": str,
}
_REQUIRED = {"last_n_blocks": "last_n_blocks:1", "surgical": "surgical:first (or middle, last)"}


def get_policy(spec: str) -> Policy:
    """A policy by name, with its argument after a colon: ``head_only``, ``last_n_blocks:2``, ``discriminative:0.5``."""
    name, _, argument = spec.partition(":")
    if name not in POLICIES:
        raise ParamGroupError(f"unknown policy {spec!r}; known: {', '.join(POLICIES)} (arguments as last_n_blocks:2)")
    if name in _PARAMETRIC:
        if not argument:
            if name in _REQUIRED:
                raise ParamGroupError(f"{name} needs an argument: {_REQUIRED[name]}")
            return POLICIES[name]()
        try:
            value = _PARAMETRIC[name](argument)
        except ValueError:
            raise ParamGroupError(f"policy {spec!r}: {argument!r} is not a {_PARAMETRIC[name].__name__}") from None
        return POLICIES[name](value)
    if argument:
        raise ParamGroupError(f"policy {name!r} takes no argument (got {spec!r})")
    return POLICIES[name]
