"""Collect the results.json files of runs and sweeps into tables and figures.

    python scripts/report.py multirun/mini/vit_tiny-digits multirun/mini/gpt2_tiny-pydoc --out results/mini

Writes to --out (default: the first folder): results.csv (one row per model/data/weight/budget
mode/budget: relative MACs in the conventions replaced, model, paper; the metric's mean and std over
seeds), runs.csv (one row per run), results.md (those rows per model/data, the dense start as a
reference, the paper's number beside a row matching a setting of gblr/report/reference.json, the learned
GBLR allocation, the runs skipped and why), acc_vs_flops.png / ppl_vs_flops.png (metric against
relative MACs, one line per weight type, error bars over seeds), allocation.png (learned GBLR MACs
per layer type and depth, the paper's Table 3) and layout.png (learned block layout of GBLR layers,
the paper's Figure 4, from a run's checkpoint.pt). A run is skipped, and listed with the reason,
when its results.json is missing (a crashed job has error.txt, an interrupted one checkpoint.pt),
unreadable (partial), a dry run or incomplete. The work is done by gblr.report.
"""
import argparse
import sys
from pathlib import Path

from gblr.report.collect import CONVENTIONS, collect
from gblr.report.write import write_report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep or run folders to search for results.json")
    parser.add_argument("--out", help="output folder (default: the first DIR)")
    parser.add_argument("--flops", choices=list(CONVENTIONS), default="model", help="x axis of the metric figures")
    parser.add_argument("--reference", default="lowrank", help="weight type the paired differences are taken against")
    args = parser.parse_args(argv)
    out = Path(args.out or args.dirs[0])

    results, skipped = collect(args.dirs)
    for folder, reason in skipped:
        print(f"skipped {folder}: {reason}")
    if not results:
        print(f"error: no completed results.json under {', '.join(args.dirs)}", file=sys.stderr)
        sys.exit(2)
    report = write_report(results, skipped, out, flops=args.flops, reference_weight=args.reference)
    for note in report["notes"]:
        print(note)
    print(report["markdown"])
    print(f"{len(results)} runs in {len(report['rows'])} rows, {len(skipped)} skipped; wrote to {out}: results.csv, "
          f"runs.csv, paired.csv, results.md, {', '.join(f.name for f in report['figures'])}")
    return report


if __name__ == "__main__":
    main()
