"""torchvision-style dotted parameter names: an nnx path joined with dots, and whole modules collapsed for display."""

from __future__ import annotations

from collections.abc import Iterable

import jax


def dotted_name(path: tuple) -> str:
    """An nnx path as a torchvision state_dict key: ``("layer4", 1, "conv2", "weight")`` -> ``"layer4.1.conv2.weight"``.

    Integer parts are the indices of Sequential children, as torch names them.
    """
    return ".".join(str(part) for part in path)


def key_path_name(path: tuple) -> str:
    """A ``jax.tree_util`` key path as a dotted name: dict keys, sequence indices and attribute names joined.

    The ``value`` attribute that an ``nnx.Variable`` flattens to is left out, so a parameter tree's paths
    read as the parameters' torchvision names.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def collapse_names(keys: list[str], universe: Iterable[str]) -> list[str]:
    """``keys`` with each whole module shown once: ``layer1.2.* (15 keys)`` instead of its 15 keys.

    A module is whole when every key of ``universe`` under it is in ``keys``.
    """
    chosen, universe = set(keys), list(universe)
    lines: list[str] = []
    done: set[str] = set()
    for key in keys:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            members = [k for k in universe if k.startswith(prefix)]
            if len(members) > 1 and all(k in chosen for k in members):
                if prefix not in done:
                    done.add(prefix)
                    lines.append(f"{prefix}* ({len(members)} keys)")
                break
        else:
            lines.append(key)
    return lines
