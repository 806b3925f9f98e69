"""CLI: python -m medpmoe.pretrain --images DIR_OR_DATALIST [--output_dir O] [--method mae|dino] [--arch A]
[--image_size S] [--epochs N] [--key value ...]: every argument of `medpmoe.pretrain.pretrain`, values written as
Python literals ("['/a', '/b']", "{'depth': 4}", True, 1e-3) or plain text."""

from __future__ import annotations

import argparse
import ast
import inspect
import sys


def literal(text: str):
    """A Python literal (list, dict, number, True/False/None), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parser(func, prog: str) -> argparse.ArgumentParser:
    """One `--name` option per parameter of `func` (required when it has no default)."""
    p = argparse.ArgumentParser(prog=prog, description=(func.__doc__ or "").split("\n\n")[0])
    for name, param in inspect.signature(func).parameters.items():
        required = param.default is inspect.Parameter.empty
        p.add_argument(f"--{name}", type=literal, required=required,
                       default=None if required else param.default,
                       help="required" if required else f"default: {param.default!r}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the options and pretrain; a mistake in the input ends with one line naming it."""
    from medpmoe.bundle.errors import exit_on_user_error, install_excepthook
    from medpmoe.pretrain.run import pretrain

    args = parser(pretrain, "python -m medpmoe.pretrain").parse_args(argv)
    install_excepthook()
    try:
        pretrain(**vars(args))
    except Exception as err:
        exit_on_user_error(err)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
