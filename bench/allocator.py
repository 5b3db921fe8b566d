"""glibc's malloc against tcmalloc, for jaxtl and PyTorch alike: bench/cpu_steps.py's cases in fresh
processes, alternately without and with tcmalloc preloaded (``LD_PRELOAD``).

XLA:CPU allocates and frees its large temporaries every step; glibc hands such blocks back to the OS
(mmap / munmap above its threshold), so every step pays page faults for fresh pages. tcmalloc keeps
them. The table gives each side's median images per second under each allocator and the gain.

    python bench/allocator.py [--tcmalloc PATH] [--archs resnet18] [--cases full,eval] [--rounds 2] [--json PATH]

tcmalloc on Debian / Ubuntu: ``apt-get install libtcmalloc-minimal4``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cpu_steps import write_json  # bench/, the directory of this script

HERE = Path(__file__).resolve().parent
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
SIDES = ("jaxtl", "torch NCHW", "torch channels_last")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcmalloc", default=TCMALLOC, help="the tcmalloc shared library to preload")
    parser.add_argument("--archs", default="resnet18")
    parser.add_argument("--cases", default="full,eval", help="bench/cpu_steps.py's --cases")
    parser.add_argument("--rounds", type=int, default=2, help="processes per allocator, alternating")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round inside each process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not Path(args.tcmalloc).is_file():
        parser.error(f"--tcmalloc {args.tcmalloc} does not exist; install it (apt-get install libtcmalloc-minimal4) "
                     "or give its path")  # fmt: skip

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    rates: dict[str, dict[tuple[str, str], list[float]]] = {"glibc": {}, "tcmalloc": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for allocator in ("glibc", "tcmalloc"):
                out = Path(tmp) / f"{allocator}-{r}.json"
                run_env = env | {"LD_PRELOAD": args.tcmalloc} if allocator == "tcmalloc" else env
                subprocess.run(
                    [sys.executable, str(HERE / "cpu_steps.py"), "--archs", args.archs, "--cases", args.cases,
                     "--steps", str(args.steps), "--rounds", "2", "--no-compile", "--json", str(out)],
                    env=run_env, check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
                for row in json.loads(out.read_text())["images_per_second"]:
                    for side in SIDES:
                        rates[allocator].setdefault((f"{row['arch']} {row['case']}", side), []).append(row[side])
                print(f"round {r + 1} {allocator}: done", flush=True)

    print(f"\n{'case':<28} {'side':<20} {'glibc':>8} {'tcmalloc':>9} {'gain':>7}  img/s (median of {args.rounds})")
    results = []
    for (case, side), glibc in rates["glibc"].items():
        g, t = statistics.median(glibc), statistics.median(rates["tcmalloc"][(case, side)])
        results.append({"case": case, "side": side, "glibc": g, "tcmalloc": t, "gain": t / g})
        print(f"{case:<28} {side:<20} {g:8.2f} {t:9.2f} {t / g - 1:+6.0%}")
    write_json(args, "allocator", results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
