"""The documentation is generated where it can be, its links lead somewhere, the README stays a
front page, and the README's two set-up commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from instance_agent.docs import END, PAGE, START, config_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Every page a reader can reach from the front page (docs/reliability.md is generated).
PAGES = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) outside code spans; an image's ![alt](src) too. The target ends at the first
# space (a title) or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(_CODE_SPAN.sub("``", line))
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped (backticks
    included), spaces to hyphens, and -1, -2, … for repeats."""
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose(path.read_text(encoding="utf-8")) for m in _LINK.finditer(line)]


def test_the_config_table_matches_the_schema() -> None:
    page = (ROOT / PAGE).read_text(encoding="utf-8")
    table = page[page.index(START) : page.index(END) + len(END)]
    assert table == config_table(), f"run: python -m instance_agent.docs --write (it rewrites {PAGE})"


def test_ci_runs_the_readme_test_command() -> None:
    readme = README.read_text(encoding="utf-8")
    commands = re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()
    assert "instance-agent demo" in commands[0]


def test_the_readme_is_a_front_page_under_12_kb() -> None:
    size = len(README.read_bytes())
    assert size < 12_000, f"README.md is {size} bytes: move detail into docs/ and link to it"


def test_every_relative_link_leads_to_a_file_and_heading_that_exist() -> None:
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            dest = (page.parent / name).resolve() if name else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []


def test_the_readme_links_to_every_docs_page() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in _links(README)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], "README.md does not link to these pages: add each to its Documentation table"


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    """Without this, a checker that found no links at all would pass too."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` heading, twice\n\n## A `code` heading, twice\n\n"
        "[ok](#a-code-heading-twice-1) [gone](missing.md) `[not a link](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert _links(page) == ["#a-code-heading-twice-1", "missing.md"]
    assert _anchors(page) == {"a-code-heading-twice", "a-code-heading-twice-1"}


def test_the_reliability_scoreboard_was_generated_from_every_scenario_file() -> None:
    """A file that gained scenario rows but was never run into the document would leave the
    scoreboard claiming less than the tests check (and its regeneration command stale)."""
    from support.scoreboard import COMMAND

    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert COMMAND in doc, (
        "docs/reliability.md is stale: regenerate it with tests/support/scoreboard.py's command"
    )


_AWS_URL = re.compile(r"https://docs\.aws\.amazon\.com/[^\s)>;,\"'`]*[^\s)>;,\"'`.]")
BEHAVIOUR = ROOT / "docs" / "aws-behaviour.md"


def test_every_aws_page_the_code_cites_is_in_aws_behaviour_and_the_module_names_it() -> None:
    """docs/aws-behaviour.md holds the AWS facts the code relies on, each with its source: a
    comment that cites an AWS page directly cites a fact the page must hold, and its module
    names the page, so a reader finds the fact in our words and a change to it in one place."""
    stated = set(_AWS_URL.findall(BEHAVIOUR.read_text(encoding="utf-8")))
    missing, unnamed = [], []
    modules = [*(ROOT / "instance_agent").rglob("*.py"), *(ROOT / "lambda_trigger").rglob("*.py")]
    for module in sorted(modules):
        text = module.read_text(encoding="utf-8")
        cited = _AWS_URL.findall(text)
        where = module.relative_to(ROOT)
        missing += [f"{where}: {url}" for url in cited if url not in stated]
        if cited and "docs/aws-behaviour.md" not in text:
            unnamed.append(str(where))
    assert missing == [], "state these pages' facts in docs/aws-behaviour.md, with the page"
    assert unnamed == [], "these modules cite AWS pages but not docs/aws-behaviour.md"


def test_the_aws_page_check_reads_a_url_as_a_comment_writes_it() -> None:
    """Without this, a pattern that matched nothing would pass the check above."""
    line = "# (https://docs.aws.amazon.com/a/b.html#c). See <https://docs.aws.amazon.com/d.html>, too"
    assert _AWS_URL.findall(line) == [
        "https://docs.aws.amazon.com/a/b.html#c",
        "https://docs.aws.amazon.com/d.html",
    ]
