"""The environment of a subprocess whose jax sees several CPU devices (the count is fixed when jax starts).

Tests import it as ``devices``, as they import ``tiny``: pytest puts tests/ on ``sys.path``.
"""

import os


def host_devices_env(count: int, **extra: str) -> dict[str, str]:
    """``os.environ`` with ``count`` host devices forced after the XLA flags already set (the suite's compile options
    included, which a subprocess would otherwise lose), and ``extra`` variables."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    return dict(os.environ, XLA_FLAGS=flags, **extra)
