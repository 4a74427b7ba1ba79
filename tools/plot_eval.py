#!/usr/bin/env python3
"""Plots defkv-eval results: average accuracy against cache size, one line per press.

    tools/plot_eval.py OUT/results.csv [-o OUT/accuracy.png] [--length 4096]

The average is the unweighted mean over tasks of round(100 * mean score, 2), as in table.md.
The full cache (press none) is drawn as a dashed horizontal line. Failed requests are left out.
Needs matplotlib (tools/requirements.txt).
"""
import argparse
import collections
import csv
import pathlib
import sys


def averages(rows, length=None):
    """{(length, press): {cache_fraction: avg score x 100}} from results.csv rows."""
    sums = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        if r["score"] == "" or (length is not None and int(r["length"]) != length):
            continue
        key = (int(r["length"]), r["press"], 1.0 - float(r["ratio"]), r["task"])
        sums[key][0] += float(r["score"])
        sums[key][1] += 1
    per_task = collections.defaultdict(list)
    for (ln, press, cache, _task), (total, n) in sums.items():
        per_task[(ln, press, cache)].append(round(100.0 * total / n, 2))
    out = collections.defaultdict(dict)
    for (ln, press, cache), scores in per_task.items():
        out[(ln, press)][cache] = sum(scores) / len(scores)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=pathlib.Path, help="results.csv written by defkv-eval")
    ap.add_argument("-o", "--output", type=pathlib.Path, help="PNG to write (default: accuracy.png beside the CSV)")
    ap.add_argument("--length", type=int, help="only this target length (RULER)")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    with open(args.results, newline="") as f:
        data = averages(list(csv.DictReader(f)), args.length)
    if not data:
        print(f"plot_eval: no scored rows in {args.results}", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (ln, press), points in sorted(data.items()):
        label = press if len({k[0] for k in data}) == 1 else f"{press} ({ln})"
        xs = sorted(points)
        if press.lower() in ("none", "full", "no_press"):
            ax.axhline(points[xs[-1]], linestyle="--", color="gray", label=f"{label} (full cache)")
            continue
        ax.plot([100 * x for x in xs], [points[x] for x in xs], marker="o", label=label)
    ax.set_xlabel("cache kept (%)")
    ax.set_ylabel("average score")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out = args.output or args.results.with_name("accuracy.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
