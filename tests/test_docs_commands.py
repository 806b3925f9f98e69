"""Every shell command shown in README.md and docs/ is checked against the code it calls, so a renamed option, config
key, module or file cannot leave the docs wrong: bundle commands parse with their config files and every `--key` is a
key of that workflow with a value of its type; medpmoe/script/benchmark command lines parse with their own argparse
parser; make targets, mlflow options and test files exist. (tests/test_docs_run.py runs the same commands on demo
data.)"""

from __future__ import annotations

import argparse
import ast
import re
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        *sorted((REPO_ROOT / "bundles").glob("*/docs/README.md")), *sorted(REPO_ROOT.glob("*/README.md"))]
SHELL_BLOCK = re.compile(r"```(bash|sh|shell|console)\n(.*?)```", re.S)
SKIP = ("curl", "cd", "pip", "git", "export", "cp", "mkdir", "ls", "cat", "echo")


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command in a shell code block, continuation lines joined, `$VAR`s of the block
    substituted, comments dropped."""
    found = []
    for doc in dict.fromkeys(DOCS):
        text = doc.read_text()
        for block in SHELL_BLOCK.finditer(text):
            line_no = text[: block.start()].count("\n") + 2
            env: dict[str, str] = {}
            for line in block.group(2).replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                argv = shlex.split(line, comments=True)
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                    name, value = argv.pop(0).split("=", 1)
                    env[name] = value
                argv = [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
                if argv:
                    found.append((f"{doc.relative_to(REPO_ROOT)}:{line_no}", argv))
    return found


COMMANDS = documented_commands()


def _config_files(value: str) -> list[str]:
    return list(ast.literal_eval(value)) if value.startswith("[") else [value]


def _options(args: list[str]) -> dict[str, str]:
    opts, i = {}, 0
    while i < len(args):
        assert args[i].startswith("--"), f"expected --key value pairs, got {args[i:]}"
        key, _, inline = args[i][2:].partition("=")
        if inline:
            opts[key], i = inline, i + 1
        else:
            opts[key], i = args[i + 1], i + 2
    return opts


def check_bundle_command(args: list[str]) -> None:
    """`python -m monai.bundle <verb> ...`: files exist, the run id and every `--key` exist, values have the
    default's type (as MONAI's command line parses them)."""
    from fire.parser import DefaultParseValue
    from monai.bundle import ConfigParser

    from medpmoe.bundle.config_check import _is_code, _same_kind

    verb, rest = args[0], args[1:]
    run_id = rest.pop(0) if verb in ("run", "verify_net_in_out") and rest and not rest[0].startswith("--") else None
    opts = _options(rest)
    for key in ("meta_file", "filepath"):
        if key in opts:
            assert (REPO_ROOT / opts.pop(key)).is_file(), f"--{key}: no such file"
    if "config_file" not in opts:
        return
    files = _config_files(opts.pop("config_file"))
    for f in files:
        assert (REPO_ROOT / f).is_file(), f"--config_file: no such file {f}"
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / f) for f in files])
    parser.resolve_macro_and_relative_ids()
    if verb == "run":
        assert (run_id or "run") in parser, f"no entry point {run_id!r} in {files}"
    if verb == "verify_net_in_out":
        assert (run_id or "network_def") in parser
    for key, text in opts.items():
        assert key in parser, f"--{key} is not a key of {files}"
        default, value = parser[key], DefaultParseValue(text)
        if not (_is_code(default) or default is None or _same_kind(value, default)):
            raise AssertionError(f"--{key} {text}: the default {default!r} is of another type")


class _Parsed(Exception):
    """Raised right after a command line parsed: nothing else of the program runs."""


def check_argparse_command(target: str, args: list[str], module: bool) -> None:
    """Run `target` (module or script) until its argparse parser has read `args`; SystemExit means it refused."""
    real = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_then_stop), \
            mock.patch.object(sys, "argv", [target, *args]), pytest.raises(_Parsed):
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO_ROOT / target), run_name="__main__")


def check_mlflow_command(args: list[str]) -> None:
    """`mlflow <group> <command> --options`: click resolves every subcommand and accepts every option."""
    import click
    from mlflow.cli import cli

    command, ctx = cli, None
    try:
        while args:
            ctx = command.make_context(ctx.info_name if ctx else "mlflow", list(args), parent=ctx)
            if not hasattr(command, "resolve_command"):
                return
            name, command, args = command.resolve_command(ctx, ctx._protected_args + ctx.args)
    except click.UsageError as err:
        raise AssertionError(f"mlflow refuses {args}: {err}") from err


#: docs/bundles.md's example of a fourth bundle: tests/test_bundle_recipe.py builds and trains it in a copy
NEW_BUNDLE = "bundles/brain_seg"


def check(argv: list[str]) -> None:
    """Dispatch one documented command to its check."""
    prog, args = Path(argv[0]).name, argv[1:]
    if any(NEW_BUNDLE in a for a in args) or args[-1:] == ["brain_seg"]:
        return
    if prog == "make":
        targets = re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M)
        assert all(a in targets for a in args), f"make targets {args} not all in {targets}"
    elif prog == "torchrun":
        inner = args[args.index("-m") + 1:]
        assert inner[0] == "monai.bundle", inner
        check_bundle_command(inner[1:])
    elif prog.startswith("python"):
        if args[:2] == ["-m", "monai.bundle"]:
            check_bundle_command(args[2:])
        elif args[:2] == ["-m", "pytest"]:
            paths = [a for a in args[2:] if a.startswith("tests/")]
            assert all((REPO_ROOT / p).exists() for p in paths), paths
        elif args[0] == "-m":
            check_argparse_command(args[1], args[2:], module=True)
        else:
            assert (REPO_ROOT / args[0]).is_file(), f"no script {args[0]}"
            check_argparse_command(args[0], args[1:], module=False)
    elif prog == "mlflow":
        check_mlflow_command(args)
    elif prog == "bash":
        assert (REPO_ROOT / args[0]).is_file()
    else:
        assert prog in SKIP, f"no check for {prog!r}: add one to tests/test_docs_commands.py"


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30 and any(argv[:2] == ["make", "demo"] for _, argv in COMMANDS)


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command(where, argv, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the commands run from the repository root, as the docs say
    check(argv)


def test_the_check_catches_renamed_options_keys_and_files(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    for bad in (["python", "-m", "monai.bundle", "run", "training", "--config_file", "bundles/kvasir_seg/train.json",
                 "--learnng_rate", "0.1"],
                ["python", "-m", "monai.bundle", "run", "training", "--config_file", "bundles/kvasir_seg/train.json",
                 "--num_epochs", "2.5"],
                ["python", "-m", "monai.bundle", "run", "trainig", "--config_file", "bundles/kvasir_seg/train.json"],
                ["python", "-m", "medpmoe.crossval", "--config", "bundles/kvasir_seg/train.json"],
                ["python", "-m", "medpmoe.data.convert", "kvasir_sseg", "/data", "out.json"],
                ["mlflow", "ui", "--backend-store", "sqlite:///x.db"],
                ["make", "demos"]):
        with pytest.raises((AssertionError, SystemExit)):
            check(bad)
