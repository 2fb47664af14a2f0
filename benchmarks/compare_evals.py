"""Compare saved evaluation reports of drafters on the same prompts: tau with its interval, and tau ratios.

    python benchmarks/compare_evals.py BASE.json OTHER.json [MORE.json ...]

Each report is what `draftopd eval --out` (or `draftopd recipe`) saved. For every set and the "all" row it prints
tau [95% CI] of each report and, for each report after the first, the paired bootstrap of tau_OTHER / tau_BASE over
the same prompts; "no difference" where that interval contains 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from draftopd.eval.evaluate import EvalReport, compare_tau


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args()
    reports = [EvalReport.load(p) for p in args.reports]
    base = reports[0]
    names = [p.parent.name + "/" + p.stem for p in args.reports]
    print("| set | " + " | ".join(f"{n} tau [95% CI]" for n in names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(reports) - 1))
    for row in base.rows:
        cells = [f"{r.row(row.name).tau:.3f} [{r.row(row.name).tau_ci[0]:.3f}, {r.row(row.name).tau_ci[1]:.3f}]" for r in reports]
        for other in reports[1:]:
            c = compare_tau(base, other, row.name)
            verdict = "" if c.differs else " (no difference)"
            cells.append(f"{c.ratio:.3f} [{c.ci[0]:.3f}, {c.ci[1]:.3f}]{verdict}")
        print(f"| {row.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
