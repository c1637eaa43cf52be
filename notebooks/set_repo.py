"""Point every Colab badge and Colab install line (notebooks and README) at the GitHub
repository that `pyproject.toml` names under [project.urls] Repository: the one place a fork
changes.

    python notebooks/set_repo.py          # after changing that URL in a fork
    python notebooks/set_repo.py --check  # exit 1 if a notebook or the README names another
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# owner/name after "github.com/" (pip URLs) or "colab.research.google.com/github/" (badges)
_GITHUB = re.compile(r"(colab\.research\.google\.com/github/|github\.com/)([\w.-]+/[\w.-]+?)(?=/blob/|\"|\)|\s|$)")


def repository(root: Path = ROOT) -> str:
    """`owner/name` of the Repository URL in `root/pyproject.toml`."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'^Repository\s*=\s*"https://github\.com/([\w.-]+/[\w.-]+?)/?"', text, re.M)
    if not found:
        raise SystemExit('pyproject.toml: no [project.urls] Repository = "https://github.com/<owner>/<name>"')
    return found.group(1)


def named(text: str) -> set[str]:
    """Every owner/name that the GitHub and Colab links in `text` point at."""
    return {m.group(2) for m in _GITHUB.finditer(text)}


def set_repo(root: Path = ROOT, check: bool = False) -> list[Path]:
    """The notebooks and README under `root` that name another repository than pyproject's;
    unless `check`, rewritten to name pyproject's."""
    repo, stale = repository(root), []
    for path in sorted((root / "notebooks").glob("*.ipynb")) + [root / "README.md"]:
        text = path.read_text(encoding="utf-8")
        if named(text) - {repo}:
            stale.append(path)
            if not check:
                path.write_text(_GITHUB.sub(lambda m: m.group(1) + repo, text), encoding="utf-8")
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if any file is stale")
    args = parser.parse_args()
    stale = set_repo(check=args.check)
    for path in stale:
        print(f"{'names another repository' if args.check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
