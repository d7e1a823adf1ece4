"""The command line is a documented contract: every flag of every subcommand appears in
README.md or docs/*.md, and every flag written after `vislens COMMAND` there exists."""
from __future__ import annotations

import argparse
import re

from vislens.cli import build_parser
from vislens.paths import repo_root


def _docs() -> str:
    root = repo_root()
    return "\n".join(p.read_text(encoding="utf-8")
                     for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])


def _commands() -> dict[str, argparse.ArgumentParser]:
    """'capture' -> its parser, 'organism train' -> the nested one."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out[(prefix + " " + name).strip()] = sub
                    walk(sub, prefix + " " + name)

    walk(build_parser(), "")
    return out


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def test_every_cli_flag_is_documented():
    docs = _docs()
    missing = [f"{cmd} {flag}" for cmd, p in _commands().items() for flag in sorted(_flags(p))
               if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", docs)]
    assert not missing, f"flags in --help but in neither README.md nor docs/: {missing}"


def test_every_documented_flag_exists():
    cmds = _commands()
    # one command line per code line or backtick span: `vislens CMD [SUB] ... --flag ...`
    spans = re.findall(r"`([^`\n]*)`", _docs()) + _docs().splitlines()
    wrong = []
    for span in spans:
        for m in re.finditer(r"vislens ([a-z-]+)(?: (train|eval))?([^|;`]*)", span):
            cmd = f"{m.group(1)} {m.group(2)}" if m.group(2) else m.group(1)
            if cmd not in cmds:
                continue
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(3)):
                if flag != "--help" and flag not in _flags(cmds[cmd]):
                    wrong.append(f"vislens {cmd} {flag}")
    assert not wrong, f"documented flags that the command lacks: {sorted(set(wrong))}"
