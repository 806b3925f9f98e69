"""CLI: python -m medpmoe.data.convert <layout or task name> <root> <out.json> [--on-error raise|skip]
[--image-dir DIR] [--task NAME] [--splits train val test] [--sequences CSV]."""

from __future__ import annotations

import argparse
import sys

from medpmoe.data.converters import LAYOUTS, MEDMNIST_SPLITS
from medpmoe.data.errors import DataError
from medpmoe.files import shown
from medpmoe.data.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    """Convert a dataset layout into a datalist JSON (opening every file); print a summary and any skipped files."""
    ap = argparse.ArgumentParser(prog="python -m medpmoe.data.convert", description=__doc__)
    aliases = {name: t.converter for name, t in TASKS.items() if t.converter and name not in LAYOUTS}
    ap.add_argument("layout", choices=sorted(LAYOUTS) + sorted(aliases),
                    help="a layout, or a registered task name standing for its layout (e.g. kvasir_seg, dermamnist)")
    ap.add_argument("root", help="dataset folder (for 'medmnist': the .npz file)")
    ap.add_argument("out", help="datalist JSON to write")
    ap.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                    help="raise: stop listing every bad file; skip: write the good items, report the rest")
    ap.add_argument("--image-dir", help="medmnist: folder for the PNG files")
    ap.add_argument("--task", help="medmnist: registered task name giving the class names")
    ap.add_argument("--splits", nargs="+", choices=MEDMNIST_SPLITS, help="medmnist: official splits to write "
                    "(default: every split in the file)")
    ap.add_argument("--sequences", help="cvc: CSV with columns image,sequence (video of each frame -> patient_id)")
    a = ap.parse_args(argv)
    if a.layout in aliases:  # a task name: its layout, and for MedMNIST its class names
        a.task = a.task or (a.layout if aliases[a.layout] == "medmnist" else None)
        a.layout = aliases[a.layout]
    try:
        if a.layout == "medmnist":
            classes = list(TASKS[a.task].classes) if a.task else None
            report = LAYOUTS[a.layout](a.root, a.out, image_dir=a.image_dir, classes=classes, splits=a.splits,
                                       on_error=a.on_error)
        elif a.layout == "cvc":
            report = LAYOUTS[a.layout](a.root, a.out, on_error=a.on_error, sequences=a.sequences)
        else:
            report = LAYOUTS[a.layout](a.root, a.out, on_error=a.on_error)
    except (DataError, KeyError) as e:
        print(f"error: {shown(e)}", file=sys.stderr)
        return 2
    print(f"wrote {shown(a.out)}\n{report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
