"""The design document lives in the repository (docs/DESIGN.md) and what points at it resolves: a clone has
every file and section the README, the comments and the document itself name."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
SKIP_DIRS = {".git", "build", "dist", "runs", "data", ".whl", "gpu_out", "__pycache__", ".pytest_cache",
             ".benchmarks", "results"}
TEXT_EXT = (".py", ".md", ".sh", ".cpp", ".h", ".cu", ".toml", ".ini", ".txt", ".cfg")


def _text_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith(TEXT_EXT) or name in ("Makefile", "run"):
                path = os.path.join(dirpath, name)
                with open(path, errors="replace") as f:
                    yield os.path.relpath(path, ROOT), f.read()


def _headings(text):
    return {m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def design():
    assert os.path.isfile(DESIGN), "docs/DESIGN.md is missing"
    with open(DESIGN) as f:
        return f.read()


def test_references_to_the_design_point_into_the_repository(design):
    headings = _headings(design)
    seen = 0
    for rel, text in _text_files():
        if rel == os.path.join("tests", "test_docs.py"):
            continue
        for m in re.finditer(r"(\S*)DESIGN\.md", text):
            seen += 1
            assert m.group(1).endswith("docs/") or rel.startswith("docs"), \
                f"{rel}: {m.group(0)!r} does not point at docs/DESIGN.md"
        # A section named right after the path (`docs/DESIGN.md "Backward"`, possibly across a comment line).
        for m in re.finditer(r'docs/DESIGN\.md,?\s*(?:#\s*)?"([^"]+)"', text):
            assert m.group(1) in headings, f"{rel}: docs/DESIGN.md has no section {m.group(1)!r}"
    assert seen >= 2, "the README and benchmarks/gpu_check.sh should point at docs/DESIGN.md"


def test_nothing_points_at_the_old_location_outside_the_repository():
    for rel, text in _text_files():
        if rel == os.path.join("tests", "test_docs.py"):
            continue
        assert "../shared/" not in text, f"{rel} points outside the repository (../shared/)"


def test_design_contents_links_resolve(design):
    anchors = {_anchor(h) for h in _headings(design)}
    links = re.findall(r"\]\(#([^)]+)\)", design)
    assert links, "the contents line links the sections"
    for link in links:
        assert link in anchors, f"docs/DESIGN.md links #{link}, which no heading produces"


def test_paths_the_design_names_exist(design):
    """Every repository path the document spells out in backticks exists (a rename updates the design)."""
    paths = set(re.findall(r"`((?:csrc|simclr_ext|python|tests|benchmarks|docs|\.ci)/[\w./-]+\.\w+)`", design))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"docs/DESIGN.md names paths that do not exist: {missing}"


def _file_map(design):
    """(path, line) of every entry of the tree in "The house": names at the left (indent 2 per level), a
    description after them; a line may list several files of one folder, comma-separated."""
    section = design.split("## The house", 1)[1]
    block = section.split("```", 2)[1]
    stack, entries = [], []
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 10:  # blank, or a description's continuation
            continue
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        depth = indent // 2
        del stack[depth:]
        for name in names.split(", "):
            entries.append(("/".join(stack + [name.rstrip("/")]), line.strip()))
        if names.endswith("/"):
            stack.append(names.rstrip("/"))
    return entries


def test_file_map_matches_the_tree(design):
    entries = _file_map(design)
    assert len(entries) > 40, entries
    missing = [f"{path}  (line: {line})" for path, line in entries if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, "docs/DESIGN.md's file map names what the tree does not have:\n" + "\n".join(missing)


def test_file_map_names_every_source_of_the_library(design):
    """Every kernel source and every module of the package has its line in the map (a new file gets one)."""
    named = {path for path, _ in _file_map(design)}
    sources = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
               for f in files]
    sources += [os.path.join("simclr_ext", f) for f in os.listdir(os.path.join(ROOT, "simclr_ext"))
                if f.endswith(".py")]
    unnamed = sorted(p for p in sources if p not in named)
    assert not unnamed, f"docs/DESIGN.md's file map (\"The house\") does not name: {unnamed}"
