"""Power-loss cycles against the real daemon, the long run of tests/powerloss.

    python3 bench/powerloss.py --cycles 100 --mode strict [--torn] [--seed 1]
                               [--kinds random,new_device,...] [--workers 1,2]
                               [--fsync always] [--keep] [-v]

Mounts tests/powerloss's FUSE filesystem (needs root or fuse access, and
fuse3), runs `ingestd serve` on it under load, and cuts the power as many
times (see docs/powerloss.md). Prints the lost, duplicated and corrupt
record counts and the elapsed time; exits 1 unless all three are 0.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "powerloss"))
from cycles import CUT_KINDS, Cycles
from durable_image import MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--mode", choices=MODES, default="strict")
    parser.add_argument("--torn", action="store_true", help="keep a random prefix of unsynced ops")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(CUT_KINDS), help="cut kinds to draw from")
    parser.add_argument("--workers", default="1,2", help="server.workers values to draw from")
    parser.add_argument("--fsync", choices=("always", "never"), default="always")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each cut and problem")
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    unknown = set(kinds) - set(CUT_KINDS)
    if unknown:
        parser.error(f"unknown cut kinds {sorted(unknown)}; known: {', '.join(CUT_KINDS)}")

    work = Path(tempfile.mkdtemp(prefix="ingestd-powerloss-"))
    cycles = Cycles(
        work,
        mode=args.mode,
        torn=args.torn,
        seed=args.seed,
        fsync=args.fsync,
        kinds=kinds,
        workers=tuple(int(w) for w in args.workers.split(",")),
        log=(lambda line: print(line, flush=True)) if args.verbose else (lambda _line: None),
    )
    try:
        report = asyncio.run(cycles.run(args.cycles))
    finally:
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    t = report.tally
    print(
        f"mode={args.mode}{' torn' if args.torn else ''} seed={args.seed} "
        f"cycles={report.cycles} lost={len(t.lost)} duplicated={len(t.duplicated)} "
        f"corrupt={len(t.corrupt)} acked={report.acked} elapsed={report.elapsed:.1f}s"
    )
    print("cuts: " + ", ".join(f"{k}={v}" for k, v in sorted(report.cuts.items())))
    if not t.clean:
        for line in [*t.problems, *sorted(t.corrupt)][:20]:
            print("  " + line[:300])
    for event in report.events:
        print("  " + event[:300])
    return 0 if t.clean else 1


if __name__ == "__main__":
    sys.exit(main())
