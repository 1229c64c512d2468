"""The README's quickstart is docs/deploy.md's blocks, verbatim: the page tests/images/test_deploy_doc.py
replays on a real node, so the front page shows only commands a test has run."""

import re
from pathlib import Path

from images.test_deploy_doc import replay_blocks

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"```\w*\n(.*?)```", re.S)


def quickstart_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    return FENCE.findall(section[: section.index("\n## ", 1)])


def test_every_quickstart_block_is_a_block_of_the_deploy_page():
    page = FENCE.findall((ROOT / "docs" / "deploy.md").read_text())
    assert quickstart_blocks()
    for block in quickstart_blocks():
        assert block in page, f"README quickstart block not in docs/deploy.md:\n{block}"


def test_every_block_the_deploy_page_replays_is_in_the_quickstart():
    for _, block in replay_blocks((ROOT / "docs" / "deploy.md").read_text()):
        assert block in quickstart_blocks(), f"docs/deploy.md's replayed block missing from the README:\n{block}"
