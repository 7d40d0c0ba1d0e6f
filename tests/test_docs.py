"""The documentation says what the code does: the generated pages are the code, README's API
example runs, every command README and docs/ name parses with the CLI, every relative link and
anchor resolves."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import settings, start, stop, synthetic
from unetpp.cli import build_parser
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "benchmarks" / "REPORT.md"]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|\s|`)(?:\.venv/bin/)?(unetpp(?: [^`#\n]*)?)")


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def commands(page: Path) -> list[str]:
    """Every `unetpp ...` command line the page shows: fenced lines and inline code spans."""
    text = page.read_text()
    blocks = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    spans = CODE_SPAN.findall(prose(text))
    found = []
    for piece in [*blocks, *spans]:
        found += [m.group(1).strip() for m in COMMAND.finditer(piece)]
    return found


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of a parser and of its own subcommands (`unetpp models list`)."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found |= options(child)
    return found


def test_settings_have_descriptions():
    for cls, _, _ in load_generator().SECTIONS:
        undocumented = [name for name, info in cls.model_fields.items() if not info.description]
        assert not undocumented, f"{cls.__name__}: give these fields a description: {undocumented}"


def test_every_settings_class_is_documented():
    """A new pydantic-settings class anywhere in the packages gets its section in settings.md."""
    found = {
        match
        for folder in ("core", "server", "unetpp", "model", "export")
        for path in (ROOT / folder).rglob("*.py")
        for match in re.findall(r"^class (\w+)\(BaseSettings\)", path.read_text(), re.M)
    }
    assert found == {cls.__name__ for cls, _, _ in load_generator().SECTIONS}


@pytest.mark.parametrize("name", ["settings.md", "api-reference.md"])
def test_generated_pages_are_what_the_code_generates(name):
    """docs/settings.md is the settings classes, docs/api-reference.md the OpenAPI schema."""
    render = load_generator().PAGES[name]
    assert (ROOT / "docs" / name).read_text() == render(), (
        f"docs/{name} is stale: run .venv/bin/python docs/generate.py"
    )


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    linked = {Path(target.split("#")[0]).name for target in LINK.findall(prose(text))}
    assert {page.name for page in DOCS} <= linked


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    blocks = [line for block in FENCE.findall(README.read_text()) for line in block.splitlines()]
    test_command = ".venv/bin/python -m pytest"
    assert test_command in blocks
    assert ci[-1] == test_command
    assert "pip install -e '.[all]'" in README.read_text()


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the page's fenced blocks in `language`."""
    return [
        b.split("\n", 1)[1].rsplit("```", 1)[0]
        for b in FENCE.findall(text)
        if b.startswith(f"```{language}\n")
    ]


def test_readme_api_example_runs_as_written(tiny_repository, tmp_path, monkeypatch):
    """README's curl lines and Python client example, run against a real server on the tiny
    model; only the address changes (the example's port 8000 may be taken)."""
    text = README.read_text()
    curl = [
        line
        for block in fenced(text, "bash")
        for line in block.splitlines()
        if line.startswith("curl ")
    ]
    python = [block for block in fenced(text, "python") if "unetpp.client" in block]
    assert len(curl) == 2 and len(python) == 1
    image = synthetic(100, 130)
    (tmp_path / "cell.png").write_bytes(encode_png(image))
    monkeypatch.chdir(tmp_path)
    live = start(settings(tiny_repository))
    try:
        address = live.url.removeprefix("http://")
        _, as_json = (
            subprocess.run(
                line.replace("localhost:8000", address),
                shell=True,
                capture_output=True,
                check=True,
                timeout=60,
            )
            for line in curl
        )
        assert np.asarray(Image.open(tmp_path / "mask.png")).shape == image.shape
        assert json.loads(as_json.stdout)["mask"]["size"] == list(image.shape)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(python[0].replace("http://localhost:8000", live.url), {})
        graph = printed.getvalue().split()[0]  # mode=accurate: a graph or the adaptive cascade
        graphs = {g.name for g in read_manifest(tiny_repository).graphs}
        assert graph in graphs or graph.startswith("adaptive@")
    finally:
        stop(live)


def test_readme_commands_parse_as_written():
    """README's commands, placeholders and all (a DIR is a path to argparse), parse. A bare
    `unetpp export` is a mention, and `unetpp COMMAND --help` a pattern: only the name counts."""
    parser = build_parser()
    shown = commands(README)
    assert {line.split()[1] for line in shown if len(line.split()) > 1} >= set(subcommands())
    for line in shown:
        words = shlex.split(line)[1:]
        if len(words) < 2 or words[0].isupper():
            continue
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            pytest.fail(f"README: `{line}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_flag_a_page_names_exists(page):
    known = subcommands()
    for line in commands(page):
        words = line.split()
        if len(words) < 2 or words[1] not in known:
            continue
        unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)) - options(known[words[1]])
        assert not unknown, f"{page.name}: `{line}`: `unetpp {words[1]}` has no {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: link to {target}: no such heading"
