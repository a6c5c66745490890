"""The docs cannot rot: README.md and docs/*.md are checked against the code.

- every relative link reaches a file, and every #anchor a heading;
- every `optparity SUBCOMMAND --option` written in a page exists in optparity.cli.build_parser(),
  every `--optparity-*` option in the pytest plugin;
- the README stays short and keeps the two commands CI and newcomers rely on;
- blocks marked runnable (docs/index.md, "Writing docs") run, in a scratch folder, with the files
  the page marks, and the output the page shows appears in what they print.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from optparity.cli import build_parser
from optparity.harness.levels import suite_level

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

MAIN_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e . && "
                ".venv/bin/optparity check --all --json reports/check/all.json --junit reports/check/all.xml && "
                ".venv/bin/optparity bench --quick")
TEST_COMMAND = ".venv/bin/python -m pytest -n 2 -q"

# Pages other people are writing right now; a link to one of them is allowed while it is absent.
# Empty this once they are all on main.
PENDING_PAGES = {"docs/support.md", "docs/interactions.md", "docs/distributed-check.md",
                 "docs/regression-tracking.md"}

FENCE = re.compile(r"^(```+|~~~+)\s*([\w-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(runnable|output|file:\s*(\S+))([^>]*)-->\s*$")


@dataclass
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None      # "runnable", "output" or "file"
    args: dict = field(default_factory=dict)


def _blocks(page: Path) -> list[Block]:
    """Fenced code blocks, each with the marker comment on the line just before it (if any)."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        block = Block(page, start + 1, m.group(2), "\n".join(lines[start + 1:j]) + "\n")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mm = MARKER.match(lines[k].strip()) if k >= 0 else None
        if mm and k >= start - 2:
            block.marker = "file" if mm.group(2) else mm.group(1)
            block.args = dict(a.split("=", 1) for a in mm.group(3).split())
            if mm.group(2):
                block.args["name"] = mm.group(2)
        out.append(block)
        i = j + 1
    return out


def _prose(page: Path) -> str:
    """The page without its fenced code blocks (links inside code are examples, not links)."""
    text, keep, fence = [], True, None
    for line in page.read_text().splitlines():
        m = FENCE.match(line)
        if m and (fence is None or line.startswith(fence)):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            text.append(line)
    return "\n".join(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", _prose(page), re.M)}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_pages_found():
    names = {_rel(p) for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/verdicts.md", "docs/troubleshooting.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page):
    bad = []
    prose = re.sub(r"(`+).+?\1", "", _prose(page))   # code spans show link syntax, they are not links
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):      # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            if str(dest.relative_to(ROOT)) not in PENDING_PAGES:
                bad.append(f"{target}: no file {dest.relative_to(ROOT)}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{_rel(page)}: broken links:\n  " + "\n  ".join(bad)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _code_lines(page: Path):
    """(line text) of every code span and every line of a code block that is not output."""
    for b in _blocks(page):
        if b.lang in ("bash", "sh", "console", "shell"):
            yield from b.text.splitlines()
    for m in re.finditer(r"`([^`\n]+)`", _prose(page)):
        yield m.group(1)


def _commands(text: str):
    """(words after `optparity`, options) of each `optparity ...` command in a line of code."""
    for m in re.finditer(r"(?:^|[\s/(|&;])optparity((?: +[a-z][a-z-]*)*)((?:[^|&;#`]*))", text):
        yield m.group(1).split(), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z]\b)", m.group(2))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_commands_exist(page):
    root, bad = build_parser(), []
    plugin = (ROOT / "impl/optparity/pytest_plugin.py").read_text()
    for line in _code_lines(page):
        for words, options in _commands(line):
            parser = root
            for w in words:
                subs = _subparsers(parser)
                if not subs:
                    break
                if w not in subs:
                    bad.append(f"`optparity {' '.join(words)}`: no subcommand {w!r}")
                    parser = None
                    break
                parser = subs[w]
            if parser is None or parser is root:
                continue
            known = _options(parser)
            bad += [f"`{line.strip()}`: {o} is not an option of optparity {' '.join(words)}"
                    for o in options if o not in known]
        bad += [f"`{line.strip()}`: pytest plugin has no {o}" for o in re.findall(r"--optparity-[a-z-]+", line)
                if f'"{o}"' not in plugin]
    assert not bad, f"{_rel(page)}:\n  " + "\n  ".join(dict.fromkeys(bad))


# Options of other tools that pages name on their own, in a code span (`--junitxml`).
OTHER_TOOLS_OPTIONS = {"--junitxml"}


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    return _options(parser).union(*(_all_options(p) for p in _subparsers(parser).values()))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_options_named_alone_exist(page):
    """An option named on its own (`--numerics-only`) is an option of some optparity command."""
    known = _all_options(build_parser()) | OTHER_TOOLS_OPTIONS
    plugin = (ROOT / "impl/optparity/pytest_plugin.py").read_text()
    named = re.findall(r"`(--[a-z][a-z0-9-]*)", _prose(page))
    bad = sorted({o for o in named if o not in known and f'"{o}"' not in plugin})
    assert not bad, f"{_rel(page)} names options no optparity command has: {bad}"


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert MAIN_COMMAND in readme
    assert TEST_COMMAND in readme
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"\.venv/bin/python -m pytest -n 2 -q\s*$", ci, re.M), "CI runs the README's test command"


def test_every_page_is_linked_from_the_index():
    index = (ROOT / "docs/index.md").read_text()
    missing = [p.name for p in PAGES[1:] if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


# --- runnable blocks ---------------------------------------------------------------------------

def _runnable_pages():
    return [p for p in PAGES if any(b.marker == "runnable" for b in _blocks(p))]


def _normalise(line: str) -> str:
    line = re.sub(r"\d+(\.\d+)? s \(\d+ cases/s\)", "<time>", line)   # the check's own timing
    line = re.sub(r" in \d+(\.\d+)?s\b.*", "", line)                     # pytest's
    return line.rstrip()


def _shown_in(shown: str, printed: str) -> list[str]:
    """The lines of `shown` missing, in order, from `printed` (each a substring of a line)."""
    lines = [_normalise(x) for x in printed.splitlines()]
    missing, at = [], 0
    for want in (_normalise(x) for x in shown.splitlines()):
        if not want.strip() or want.strip() == "...":
            continue
        hit = next((i for i in range(at, len(lines)) if want.strip() in lines[i]), None)
        if hit is None:
            missing.append(want)
        else:
            at = hit + 1
    return missing


def test_output_check_catches_a_changed_line():
    """The comparison itself has teeth: a changed number or a reordered line is reported."""
    printed = "candidate: x\n64 cases, 0 bit-identical; 1.22 s (52 cases/s)\nexit reason\n"
    assert _shown_in("64 cases, 0 bit-identical; 9.99 s (1 cases/s)\n...\nexit reason", printed) == []
    assert _shown_in("65 cases, 0 bit-identical; 1.22 s (52 cases/s)", printed)
    assert _shown_in("exit reason\ncandidate: x", printed) == ["candidate: x"]


@pytest.mark.parametrize("page", _runnable_pages(), ids=_rel)
def test_runnable_blocks(page, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in [k for k in env if k.startswith(("PYTEST_", "PYTHONPATH"))]:
        del env[key]
    full = suite_level() == "full"
    blocks = _blocks(page)
    for b in blocks:
        if b.marker == "file":
            (tmp_path / b.args["name"]).write_text(b.text)
    ran, last = 0, None
    for b in blocks:
        if b.marker == "runnable":
            last = None
            if b.args.get("level") == "full" and not full:
                continue
            proc = subprocess.run(["bash", "-e", "-c", b.text], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
            where = f"{_rel(page)}:{b.line}"
            printed = proc.stdout + proc.stderr
            want = {int(x) for x in b.args.get("exit", "0").split(",")}
            assert proc.returncode in want, f"{where}: exit {proc.returncode}, not {want}:\n{b.text}\n{printed[-3000:]}"
            last, ran = printed, ran + 1
        elif b.marker == "output" and last is not None:
            missing = _shown_in(b.text, last)
            assert not missing, (f"{_rel(page)}:{b.line}: shown output not printed any more:\n  "
                                 + "\n  ".join(missing) + f"\n--- printed:\n{last[-3000:]}")
    assert ran or not full
