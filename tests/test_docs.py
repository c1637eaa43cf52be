"""The README is a front door to docs/: every link resolves, and the Colab links name one repository."""
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
import set_repo  # noqa: E402

PAGES = [REPO / "README.md", REPO / "results" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    text = page.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page.name != "README.md"
    for link in links:
        if "://" in link or link.startswith("#"):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        assert target.exists(), f"{page.relative_to(REPO)} links to {link}, which does not exist"


def test_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 150
    for page in (REPO / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_every_colab_link_names_the_pyproject_repository():
    assert set_repo.set_repo(check=True) == []
    for nb in (REPO / "notebooks").glob("*.ipynb"):
        assert set_repo.named(nb.read_text(encoding="utf-8")) == {set_repo.repository()}, nb.name


def test_a_fork_changes_the_repository_in_one_place(tmp_path):
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("*.py"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(text.replace(f"github.com/{set_repo.repository()}",
                                                          "github.com/someone/my-fork"))
    changed = set_repo.set_repo(tmp_path)
    assert len(changed) == len(list((REPO / "notebooks").glob("*.ipynb")))
    for nb in (tmp_path / "notebooks").glob("*.ipynb"):
        assert set_repo.named(nb.read_text(encoding="utf-8")) == {"someone/my-fork"}
    assert set_repo.set_repo(tmp_path, check=True) == []
