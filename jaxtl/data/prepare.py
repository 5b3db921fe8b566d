"""Downloads and prepares a tfds dataset as array_record files: ``python -m jaxtl.data.prepare NAME``.

Preparing needs tensorflow (tfds builds most datasets with it) and runs in its own process, which
never imports torch; training reads the prepared files with ``tfds.data_source`` and never imports
tensorflow. ``jaxtl data prepare NAME`` runs this module as a subprocess.
"""

from __future__ import annotations

import argparse
import sys


def prepare(name: str, data_dir: str | None = None) -> str:
    """Downloads and prepares ``name`` (a tfds catalog name, optionally ``name:version``); returns its folder."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtl.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="tfds catalog name, e.g. tf_flowers or tf_flowers:3.0.1")
    parser.add_argument("--data-dir", default=None, help="tfds data folder (default: tfds's, ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        print("error: preparing tfds datasets needs tensorflow-datasets: pip install 'jaxtl[data]'", file=sys.stderr)
        return 2
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        print(
            f"error: tfds builds {args.name} with tensorflow, which is not installed: pip install tensorflow "
            "(only this preparing process uses it; training reads the prepared files without it)",
            file=sys.stderr,
        )
        return 2
    try:
        folder = prepare(args.name, args.data_dir)
    except Exception as error:  # tfds raises many types; report the dataset and the cause
        print(f"error: could not prepare tfds dataset {args.name!r}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(f"prepared {args.name} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
