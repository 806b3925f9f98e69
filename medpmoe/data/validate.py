"""CLI: python -m medpmoe.data.validate DATALIST [--task T] [--classes a b ...] [--num-classes N] [--multi-label]
[--mask-threshold 128] [--fast] [--min-size 8] — open every file a datalist names and list every problem (exit code
2 if any)."""

from __future__ import annotations

import argparse
import sys

from medpmoe.data.errors import DataError
from medpmoe.data.validation import DEFAULT_MIN_SIZE
from medpmoe.files import shown


def main(argv: list[str] | None = None) -> int:
    """Check a datalist's `training`, `validation` and `test` items; print each problem and a summary."""
    from medpmoe.data.datalist import load_datalist, read_datalist_file
    from medpmoe.data.validation import check_items, quick_check

    ap = argparse.ArgumentParser(prog="python -m medpmoe.data.validate", description=__doc__)
    ap.add_argument("datalist", help="datalist JSON or CSV")
    ap.add_argument("--task", choices=["segmentation", "classification"], help="default: the datalist's 'task'")
    ap.add_argument("--classes", nargs="+", help="default: the datalist's 'classes'")
    ap.add_argument("--num-classes", type=int, help="when there is no class list")
    ap.add_argument("--multi-label", action="store_true", default=None)
    ap.add_argument("--mask-threshold", type=float, default=128, help="for masks with soft edges (JPEG, resized)")
    ap.add_argument("--fast", action="store_true", help="headers and sizes only (what bundles check at start)")
    ap.add_argument("--min-size", type=int, default=DEFAULT_MIN_SIZE, help="smallest image side accepted, in pixels "
                    "(default: %(default)s, the smallest expert patch size; bundles check against their experts' "
                    "largest)")
    a = ap.parse_args(argv)
    try:
        doc = read_datalist_file(a.datalist)
        task = a.task or doc.get("task")
        classes = a.classes or doc.get("classes")
        multi = a.multi_label if a.multi_label is not None else bool(doc.get("multi_label", False))
        items = [it for key in ("training", "validation", "test") if isinstance(doc.get(key), list)
                 for it in load_datalist(a.datalist, key, task)]
        if a.fast:
            report = quick_check(items, task, classes, a.num_classes, multi, a.mask_threshold, where=a.datalist,
                                 min_size=a.min_size)
        else:
            report = check_items(items, task, classes, a.num_classes, multi, True, a.mask_threshold,
                                 min_size=a.min_size)
    except DataError as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return 2
    print(f"{shown(a.datalist)}: {report.summary()}")
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
