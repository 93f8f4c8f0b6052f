"""The README's and the documentation pages' examples, run as written against the demo's mirror,
print what the pages show; and the documentation site builds strictly.

Python examples are a page's ```python blocks with `>>>` prompts, run in order in one namespace per
page (as a reader following the page would) by the standard library's doctest; console examples are
its ```console blocks, whose `$ ` lines are run by a shell and whose other lines are the expected
output, compared with doctest's own checker (`...` matches anything, whitespace is normalised).
Blocks without prompts are sketches naming a user's own hosts or folders and are not run.
"""

import doctest
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from wildenberg_intake.mirror import MirrorServer, build_mirror

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The README and every page of the documentation site, each run as a reader runs it: top to bottom,
# one Python session per page.
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
# Pages whose examples train (torch): marked, so that a leg without the torch extra deselects them.
RUN_PAGES = [pytest.param(p, id=p.name, marks=[pytest.mark.torch] if "get_loader(" in p.read_text() else [])
             for p in PAGES]
DEMO_SHAPE = (600, 520, 24)  # the demo's default (cli/demo.py)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block of `language`."""
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)]


def console_examples(body: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block."""
    examples, command, expected = [], None, []
    for line in body.splitlines():
        if line.startswith("$ "):
            if command is not None:
                examples.append((command, "\n".join(expected)))
            command, expected = line[2:], []
        elif command is not None:
            expected.append(line)
    if command is not None:
        examples.append((command, "\n".join(expected)))
    return examples


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's mirror, served, and an environment pointing the catalog at it."""
    folder = tmp_path_factory.mktemp("readme")
    mirror = build_mirror(folder / "mirror", shape_xyz=DEMO_SHAPE)
    with MirrorServer(mirror.root) as server:
        env = {"WILDENBERG_BOSSDB_URL": server.base_url, "WILDENBERG_INTAKE_CACHE": str(folder / "cache")}
        yield folder, env, server


def _python_examples(page: Path, globs: dict, runner) -> tuple[int, list]:
    parser, report, examples = doctest.DocTestParser(), [], 0
    for line, body in fenced_blocks(page.read_text(), "python"):
        if ">>>" not in body:
            continue
        test = parser.get_doctest(body, globs, f"{page.name} line {line}", str(page), line)
        examples += len(test.examples)
        runner.run(test, out=report.append, clear_globs=False)
        globs.update(test.globs)  # doctest copies the namespace per block; a reader's session keeps it
    return examples, report


@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_python_examples_run_and_print_what_the_page_shows(page, demo, monkeypatch):
    folder, env, _ = demo
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    work = folder / f"python-{page.stem}"
    work.mkdir()
    monkeypatch.chdir(work)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    examples, report = _python_examples(page, {"__name__": page.stem}, runner)
    assert runner.failures == 0, "".join(report)
    if page == README:
        assert examples >= 10, f"only {examples} Python examples found in the README"


def test_the_pages_hold_the_examples_the_readme_held():
    total = sum(len(doctest.DocTestParser().get_examples(body)) for page in PAGES
                for _, body in fenced_blocks(page.read_text(), "python") if ">>>" in body)
    consoles = sum(len(console_examples(body)) for page in PAGES for _, body in fenced_blocks(page.read_text(), "console"))
    assert total >= 40 and consoles >= 4, (total, consoles)


@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_console_examples_run_and_print_what_the_page_shows(page, demo):
    folder, env, _ = demo
    work = folder / f"console-{page.stem}"
    work.mkdir()
    full_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "COLUMNS": "120"}
    checker, failures = doctest.OutputChecker(), []
    for line, body in fenced_blocks(page.read_text(), "console"):
        for command, expected in console_examples(body):
            assert shlex.split(command)[0] == "wildenberg-intake", command
            done = subprocess.run(command, shell=True, cwd=work, env=full_env, capture_output=True, text=True,
                                  timeout=600)
            got = done.stdout
            if done.returncode != 0 or not checker.check_output(expected + "\n", got, FLAGS):
                failures.append(f"{page.name} line {line}: $ {command}\nexit {done.returncode}\n"
                                f"expected:\n{expected}\ngot:\n{got}\nstderr:\n{done.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)


def test_the_documentation_site_builds_strictly_with_the_api_from_the_docstrings(tmp_path):
    """Broken links, missing pages or anchors and unresolved API references fail the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    import wildenberg_intake
    first_line = wildenberg_intake.open_catalog.__doc__.split("\n")[0].split(";")[0]
    assert first_line in api  # a docstring, rendered
    for page in PAGES[1:]:
        assert (tmp_path / "site" / ("" if page.stem == "index" else page.stem) / "index.html").is_file(), page
