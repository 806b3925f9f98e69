"""CLI: python -m medpmoe.pretrain --images DIR_OR_DATALIST [--output_dir O] [--method mae|dino] [--arch A]
[--image_size S] [--epochs N] [--key value ...] (every argument of `medpmoe.pretrain.pretrain`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse `--key value` pairs like `monai.bundle run` (python-fire) and pretrain."""
    import fire

    from medpmoe.bundle.errors import exit_on_user_error, install_excepthook
    from medpmoe.pretrain.run import pretrain

    install_excepthook()
    try:
        fire.Fire(pretrain, command=list(sys.argv[1:] if argv is None else argv), name="python -m medpmoe.pretrain",
                  serialize=lambda result: None)
    except Exception as err:
        exit_on_user_error(err)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
