"""BENCHMARKS.md's index of loadtest/results/ matches the directory, and every result path the docs cite exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "loadtest" / "results"
DOCS = [REPO / "BENCHMARKS.md", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS += sorted((REPO / "loadtest").rglob("README.md"))
BRACES = re.compile(r"\{([^{}]*)\}")


def expand(pattern: str) -> list[str]:
    """Shell brace expansion: ``a-{x,y}.{json,log}`` -> four names."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for part in match.group(1).split(",") for name in expand(head + part + tail)]


def index_rows() -> list[str]:
    """The first cell of every row of the "Result files" table in BENCHMARKS.md."""
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text.split("## Result files", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[1].startswith("|---"), "the index must be a markdown table with a header"
    return [row.split(" | ", 1)[0].removeprefix("| ") for row in rows[2:]]


def test_expand() -> None:
    assert expand("a-{x,y}.{json,log}") == ["a-x.json", "a-x.log", "a-y.json", "a-y.log"]
    assert expand("plain.json") == ["plain.json"]


def test_index_lists_exactly_the_result_files() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "loadtest/results"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    files = {str(Path(path).relative_to("loadtest/results")) for path in tracked}
    indexed: list[str] = []
    for cell in index_rows():
        names = re.findall(r"`([^`]+)`", cell)
        assert names, f"index row without a file: {cell!r}"
        indexed += [name for pattern in names for name in expand(pattern)]
    assert len(indexed) == len(set(indexed)), "a file is indexed twice"
    assert sorted(set(indexed) - files) == [], "indexed in BENCHMARKS.md but not in loadtest/results/"
    assert sorted(files - set(indexed)) == [], "in loadtest/results/ but not in BENCHMARKS.md's index"


def test_cited_result_paths_exist() -> None:
    cited = 0
    for doc in DOCS:
        for pattern in re.findall(r"loadtest/results/[\w./{},-]+", doc.read_text()):
            pattern = pattern.rstrip(".,")
            if pattern.endswith("/") or "run-" in pattern or "<" in pattern:  # a directory or a user's own run
                continue
            for path in expand(pattern):
                cited += 1
                assert (REPO / path).exists(), f"{doc.relative_to(REPO)} cites {path}, which does not exist"
    assert cited >= 10


def test_experiments_are_described() -> None:
    experiments = REPO / "loadtest" / "experiments"
    readme = (experiments / "README.md").read_text()
    for path in experiments.iterdir():
        if path.name not in ("README.md", "__pycache__"):
            assert f"`{path.name}" in readme, f"{path.name} has no line in loadtest/experiments/README.md"
