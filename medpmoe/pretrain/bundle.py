"""The first `initialize` step of `bundles/pretrain_expert/train.json`: a misspelled `--key` stops the run."""

from __future__ import annotations

import inspect

#: keys of the bundle that are not arguments of `pretrain` (names, demo images, the workflow's own entries)
BUNDLE_KEYS = {"imports", "bundle_root", "demo_root", "demo_images", "demo_size", "image_files", "pretraining",
               "initialize", "run", "finalize", "training"}


def check_bundle() -> None:
    """Raise ConfigError naming any top-level key of the running config that neither the bundle nor
    `medpmoe.pretrain.pretrain` knows; also make a failed run end with medpmoe's error line."""
    from medpmoe.bundle.config_check import _running_parser
    from medpmoe.bundle.errors import ConfigError, install_excepthook
    from medpmoe.pretrain.run import pretrain

    install_excepthook()
    parser = _running_parser()
    if parser is None:
        return
    known = BUNDLE_KEYS | set(inspect.signature(pretrain).parameters)
    unknown = sorted(k for k in parser.get() if k not in known and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"config key {unknown[0]!r} is unknown to bundles/pretrain_expert (a misspelling?); "
                          f"its keys: {', '.join(sorted(known - BUNDLE_KEYS))}")
