"""Every code example in README.md and docs/ runs, in the nox session of its backend.

Fenced `python` blocks are executed and `pycon` blocks (with `>>>` prompts) run as doctests, so
a printed result on a page is checked. A block inside a content tab (`=== "PyTorch"`) belongs to
that tab's backend and runs only where that framework is installed, after the page's
framework-free blocks, in one namespace per page and backend, in page order. A tab naming several
frameworks (`=== "PyTorch + TensorFlow"`) runs where all of them are installed (the nox session
`tests-combined`).
"""

from __future__ import annotations

import doctest
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import multires
from multires.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TABS = {
    "PyTorch": "torch",
    "TensorFlow": "tf",
    "Keras": "tf",
    "Flax": "flax",
    "MXNet": "mxnet",
    "Gluon": "mxnet",
    "Hugging Face": "torch",
    "ONNX": "onnx",
}
TAB = re.compile(r'^=== "(?P<title>[^"]+)"')
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)")


@dataclass(frozen=True)
class Example:
    """One fenced code block: where it is, which backend it needs, and its code."""

    page: Path
    line: int
    backend: tuple[str, ...] | None
    lang: str
    code: str


def examples(page: Path) -> list[Example]:
    """The `python` and `pycon` blocks of a Markdown page, each with its tab's backend."""
    found: list[Example] = []
    lines = page.read_text().splitlines()
    backend: tuple[str, ...] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if tab := TAB.match(line):
            titles = tab["title"].split(" + ")
            backend = tuple(TABS[t] for t in titles) if all(t in TABS for t in titles) else None
        elif line.strip() and not line.startswith(" "):
            backend = None
        fence = FENCE.match(line)
        if fence:
            indent, lang, start = len(fence["indent"]), fence["lang"], i + 1
            i += 1
            while not lines[i].strip().startswith("```"):
                i += 1
            code = "\n".join(text[indent:] for text in lines[start:i])
            if lang in ("python", "pycon"):
                found.append(Example(page, start, backend if indent else None, lang, code + "\n"))
        i += 1
    return found


def _cases() -> list[pytest.param]:
    cases = []
    for page in PAGES:
        found = examples(page)
        for backend in sorted({e.backend for e in found}, key=str):
            selected = [e for e in found if e.backend in (None, backend)]
            name = "+".join(backend) if backend else "core"
            cases.append(pytest.param(selected, backend, id=f"{page.name}-{name}"))
    return cases


def _installed(backend: str) -> bool:
    try:
        multires.get_backend(backend)
    except BackendUnavailableError:
        return False
    return True


@pytest.mark.parametrize(("blocks", "backend"), _cases())
def test_examples_run(
    blocks: list[Example], backend: tuple[str, ...] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = [name for name in backend or () if not _installed(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed in this session")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for block in blocks:
        where = f"{block.page.relative_to(ROOT)}:{block.line}"
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)
            continue
        test = doctest.DocTestParser().get_doctest(block.code, namespace, where, where, block.line)
        runner = doctest.DocTestRunner(optionflags=flags)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        assert runner.failures == 0, "".join(report)


def test_examples_are_assigned_to_their_tabs(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nA = 1\n```\n\n"
        '=== "PyTorch"\n\n    ```python\n    B = A\n    ```\n\n'
        '=== "Flax"\n\n    ```pycon\n    >>> A\n    1\n    ```\n\n'
        '=== "PyTorch + TensorFlow"\n\n    ```python\n    D = 4\n    ```\n\n'
        "Back to prose.\n\n```bash\nls\n```\n\n```python\nC = 3\n```\n"
    )
    found = [(e.backend, e.lang, e.code) for e in examples(page)]
    assert found == [
        (None, "python", "A = 1\n"),
        (("torch",), "python", "B = A\n"),
        (("flax",), "pycon", ">>> A\n1\n"),
        (("torch", "tf"), "python", "D = 4\n"),
        (None, "python", "C = 3\n"),
    ]
