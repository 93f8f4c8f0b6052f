"""The README's examples, run as written against the demo's mirror, print what the README shows.

Python examples are the README's ```python blocks with `>>>` prompts, run in order in one namespace
(as a reader following the README would) by the standard library's doctest; console examples are
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

README = Path(__file__).resolve().parents[1] / "README.md"
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


def test_the_readme_python_examples_run_and_print_what_it_shows(demo, monkeypatch):
    folder, env, _ = demo
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    work = folder / "python"
    work.mkdir()
    monkeypatch.chdir(work)
    text = README.read_text()
    parser, globs = doctest.DocTestParser(), {"__name__": "readme"}
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report, examples = [], 0
    for line, body in fenced_blocks(text, "python"):
        if ">>>" not in body:
            continue
        test = parser.get_doctest(body, globs, f"README.md line {line}", str(README), line)
        examples += len(test.examples)
        runner.run(test, out=report.append, clear_globs=False)
        globs.update(test.globs)  # doctest copies the namespace per block; a reader's session keeps it
    assert examples >= 20, f"only {examples} Python examples found in the README"
    assert runner.failures == 0, "".join(report)


def test_the_readme_console_examples_run_and_print_what_it_shows(demo):
    folder, env, _ = demo
    work = folder / "console"
    work.mkdir()
    full_env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "COLUMNS": "120"}
    checker, failures, ran = doctest.OutputChecker(), [], 0
    for line, body in fenced_blocks(README.read_text(), "console"):
        for command, expected in console_examples(body):
            assert shlex.split(command)[0] == "wildenberg-intake", command
            done = subprocess.run(command, shell=True, cwd=work, env=full_env, capture_output=True, text=True,
                                  timeout=600)
            ran += 1
            got = done.stdout
            if done.returncode != 0 or not checker.check_output(expected + "\n", got, FLAGS):
                failures.append(f"README.md line {line}: $ {command}\nexit {done.returncode}\n"
                                f"expected:\n{expected}\ngot:\n{got}\nstderr:\n{done.stderr[-2000:]}")
    assert ran >= 4, f"only {ran} console examples found in the README"
    assert not failures, "\n\n".join(failures)
