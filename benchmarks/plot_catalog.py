"""The figure at the top of BENCHMARKS.md: per-class decode speed-up across
the whole catalogue, one curve per transformers line, from the tables that
``benchmarks/bench_catalog.py`` wrote (its markdown output):

    python benchmarks/plot_catalog.py [--out benchmarks/results/catalog_decode.png] FILE.md [FILE.md ...]

Each curve is every class x position layout row of one file, sorted by its
decode (1x1 or 3x1x1) speed-up and spread over 0-100% (the lines have
different numbers of classes) (unpatched / patched per call); the dashed
line is 1x (never slower means every point above it). Needs matplotlib
(the ``bench`` extra: ``pip install -e ".[bench]"``), never a runtime
dependency.
"""

from __future__ import annotations

import argparse
import os
import re

#: A row of bench_catalog's table: class, decode shape, unpatched, patched, decode speed-up, prefill speed-up.
ROW = re.compile(r"^\| (\w+) \| ([\dx]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \| ([\d.]+)x \|$")
#: bench_catalog's header line naming the versions it ran with.
VERSIONS = re.compile(r"transformers (\S+), (\w+),")


def read(path: str) -> tuple[str, list[float]]:
    """(label, decode speed-ups) of one bench_catalog output file."""
    label, speedups = os.path.basename(path), []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            versions = VERSIONS.search(line)
            if versions and label == os.path.basename(path):
                label = f"transformers {versions.group(1)} ({versions.group(2)})"
            row = ROW.match(line.strip())
            if row:
                speedups.append(float(row.group(3)))
    if not speedups:
        raise SystemExit(f"{path}: no bench_catalog rows found")
    return label, sorted(speedups)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="bench_catalog markdown outputs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "catalog_decode.png"))
    parser.add_argument("--title", default="rope-patch: decode speed-up per rotary class (CPU, one thread)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=120)
    for path in args.files:
        label, speedups = read(path)
        share = [100 * index / max(len(speedups) - 1, 1) for index in range(len(speedups))]
        axes.plot(share, speedups, marker=".", linewidth=1, label=f"{label}: {len(speedups)} class x layout rows")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.text(0, 1.05, "1x: unpatched", color="grey", fontsize=8)
    axes.set_yscale("log")
    axes.set_yticks([1, 2, 3, 5, 10])
    axes.get_yaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.set_ylim(bottom=0.8)
    axes.set_xlabel("% of the rotary classes x position layouts answered from tables, sorted by speed-up")
    axes.set_ylabel("decode call: unpatched / patched")
    axes.set_title(args.title, fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
