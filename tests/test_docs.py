"""The documentation stays true: README.md and docs/*.md are checked against the code.

- every `toml` code block loads as a config file (a snippet must be a whole, valid config);
- every `gateway ...` command line in an `sh` code block parses with the real command line;
- every `python` code block compiles;
- every section and field of the config is named in docs/configuration.md;
- every relative link points at a file, and at a heading of it when it names one;
- the README links every page of docs/.
"""

from __future__ import annotations

import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from gateway.cli import _build_parser
from gateway.config import load_settings
from gateway.settings import (
    GroupConfig,
    MetricsSettings,
    ModelConfig,
    ProviderConfig,
    RoutingSettings,
    ServerSettings,
    Settings,
    Target,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

# Every secret the examples read with "env:NAME".
ENV = {
    "OPENAI_API_KEY": "sk-x",
    "ANTHROPIC_API_KEY": "sk-a",
    "GEMINI_API_KEY": "g",
    "AZURE_OPENAI_API_KEY": "az",
    "GATEWAY_ADMIN_KEY": "admin-key-of-at-least-16-characters",
    "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _split(page: Path) -> tuple[list[Block], list[str]]:
    """A page's fenced code blocks, and its other lines (code blocks blanked out)."""
    blocks: list[Block] = []
    prose: list[str] = []
    opened: tuple[int, str, str, str] | None = None  # line, indent, fence, lang
    body: list[str] = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if opened is None:
            match = _FENCE.match(line)
            if match:
                opened = (number, match["indent"], match["fence"], match["info"].lower())
                body = []
                prose.append("")
            else:
                prose.append(line)
            continue
        start, indent, fence, lang = opened
        stripped = line.strip()
        if stripped.startswith(fence) and not stripped.strip(fence[0]):
            blocks.append(Block(page, start, lang, "\n".join(body) + "\n"))
            opened = None
        else:
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
        prose.append("")
    assert opened is None, f"{page.name}:{opened[0]}: code block never closed"
    return blocks, prose


SPLIT = {page: _split(page) for page in PAGES}
BLOCKS = [block for blocks, _ in SPLIT.values() for block in blocks]


def _blocks(lang: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def test_the_pages_have_examples() -> None:
    # Guards the tests below against a parser that finds nothing and so checks nothing.
    assert len(_blocks("toml")) >= 2
    assert len(_blocks("sh")) >= 4
    assert _blocks("python")


@pytest.mark.parametrize("block", _blocks("toml"), ids=_ids(_blocks("toml")))
def test_every_toml_example_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(block.body)
    load_settings(path, ENV)  # raises ConfigError naming the field when the example is wrong


def _commands(block: Block) -> list[list[str]]:
    """The `gateway` command lines of a shell block, continuation lines joined."""
    text = block.body.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and (words[0] == "gateway" or words[0].endswith("/gateway")):
            commands.append(words[1:])
    return commands


SH_COMMANDS = [(b, argv) for b in _blocks("sh") for argv in _commands(b)]


def test_the_pages_show_commands() -> None:
    assert len(SH_COMMANDS) >= 6


@pytest.mark.parametrize(
    ("block", "argv"), SH_COMMANDS, ids=[f"{b.where}:{' '.join(a[:2])}" for b, a in SH_COMMANDS]
)
def test_every_command_line_example_parses(block: Block, argv: list[str]) -> None:
    try:
        _build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{block.where}: `gateway {shlex.join(argv)}` does not parse")


@pytest.mark.parametrize("block", _blocks("python"), ids=_ids(_blocks("python")))
def test_every_python_example_compiles(block: Block) -> None:
    compile(block.body, block.where, "exec")


def test_every_config_field_is_documented() -> None:
    page = DOCS / "configuration.md"
    text = page.read_text()
    for section in msgspec.structs.fields(Settings):
        header = f"[[{section.name}]]" if section.default == () else f"[{section.name}]"
        assert f"`{header}`" in text, f"{page.name} has no section on {header}"
    providers = typing.get_args(ProviderConfig)  # every provider type's own fields too
    structs = (ServerSettings, RoutingSettings, MetricsSettings, *providers, Target, ModelConfig)
    for struct in structs:
        for field in msgspec.structs.fields(struct):
            name = f"{struct.__name__}.{field.name}"
            assert f"`{field.name}`" in text, f"{page.name} does not describe {name}"
    for field in msgspec.structs.fields(GroupConfig):
        assert f"`{field.name}`" in text, f"{page.name} does not describe groups.{field.name}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in (SPLIT[page] if page in SPLIT else _split(page))[1]:
        match = _HEADING.match(line)
        if match:
            base = slug(match["text"])
            anchor, n = base, 0
            while anchor in found:  # GitHub numbers repeated headings: name, name-1, name-2
                n += 1
                anchor = f"{base}-{n}"
            found.add(anchor)
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """The relative link targets of a page's prose (code blocks and code spans left out)."""
    found = []
    for number, line in enumerate(SPLIT[page][1], 1):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match["target"]
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                found.append((number, target))
    return found


def test_slugs_as_github_makes_them() -> None:
    assert slug("Routing, retries and failover") == "routing-retries-and-failover"
    assert slug("`env:` secrets") == "env-secrets"
    assert slug("`[[providers]]`") == "providers"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    for number, target in links(page):
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{where}: no such file"
        assert dest.is_relative_to(ROOT), f"{where}: outside the repository"
        if anchor:
            assert dest.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
            assert anchor in anchors(dest), f"{where}: no heading #{anchor} in {dest.name}"


def test_the_pages_link_to_each_other() -> None:
    assert sum(len(links(page)) for page in PAGES) >= len(PAGES)


def test_the_readme_links_every_docs_page() -> None:
    linked = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"
