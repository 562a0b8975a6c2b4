"""The README's commands, run as a reader runs them.

1. Every ```bash block of README.md that the line before marks with `<!-- runs after the quick start -->` runs as
   written (bash -e -o pipefail, from the repository's root) in the state the quick start leaves: the demo's data
   in test/output/digits_data and its run in test/output/0/. That state comes from a short demo run in a copy of
   the repository under tmp_path (the real test/output is never touched): the demo's own data (make_digits.py, as
   test/demo.sh writes it) with the validation set cut to 3 images a class, then `bash test/demo.sh --epochs=1
   --max-steps 2 --workers 0 --device cpu`: the same launcher, recipe, files and summary as the 10-epoch demo.
   The blocks are independent of each other, so they run side by side. Each must exit 0 and print no `error:`
   and no traceback.
2. Every `main.py` and launcher command in any bash block of README.md and docs/*.md uses only flags main.py takes
   (config.get_args_parser; for a launcher, after its own --data_path=, --epochs=, --recipe= and --device_id=), and
   every command of a tool (predict.py, export_onnx.py, plot_metrics.py, run_summary.py, benchmark.py) only
   flags that tool takes.
3. Every relative link in README.md and docs/*.md names a file that exists and, with #anchor, one of its headings.

Processes run with one thread each (conftest.clean_env): on a small shared machine torch's spinning threads
otherwise make the demo run many times slower.
"""
import concurrent.futures
import contextlib
import glob
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, clean_env

MARKER = "<!-- runs after the quick start -->"
DEMO_FAST = ["--epochs=1", "--max-steps", "2", "--workers", "0", "--device", "cpu"]
VAL_IMAGES_PER_CLASS = 3
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def marked_blocks():
    text = read(os.path.join(REPO, "README.md"))
    blocks = re.findall(re.escape(MARKER) + r"\n```bash\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == text.count(MARKER), f"a {MARKER!r} line not directly followed by a ```bash block"
    return blocks


def bash_blocks(path):
    return re.findall(r"^```bash\n(.*?)\n```", read(path), flags=re.S | re.M)


BLOCKS = marked_blocks()


# 1. The blocks that run after the quick start ---------------------------------------------------------------

def copy_repository(dst):
    """The checkout without its history, caches and run outputs."""
    skip_anywhere = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks", ".venv", "venv"}

    def ignore(folder, names):
        rel = os.path.relpath(folder, REPO)
        skipped = [n for n in names if n in skip_anywhere or n.endswith((".pth", ".onnx"))]
        if rel in (".", "test"):  # run outputs (and /demo_data/, which .gitignore lists too)
            skipped += [n for n in names if n in ("output", "demo_data")]
        return skipped

    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    return str(dst)


def run_bash(script, cwd, env, timeout=600):
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def reader_env(tmp):
    """The reader's shell: `python` and `python3` are this interpreter, no launcher variables."""
    shims = os.path.join(tmp, "bin")
    os.makedirs(shims)
    for name in ("python", "python3"):
        os.symlink(sys.executable, os.path.join(shims, name))
    env = {k: v for k, v in clean_env().items()
           if not k.startswith("SLURM_") and k not in ("PYTHON", "DEMO_DATA", "MAX_RESTARTS")}
    env["PATH"] = shims + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def after_quick_start(tmp_path_factory):
    """(repository copy, environment, {block index: (exit code, output)}): the marked blocks' results, run side
    by side after a short demo run."""
    tmp = tmp_path_factory.mktemp("readme")
    repo = copy_repository(tmp / "repo")
    env = reader_env(str(tmp))
    data = os.path.join(repo, "test", "output", "digits_data")
    code, out = run_bash(f"python make_digits.py {shlex.quote(data)} --size 32 --seed 0", repo, env)  # as demo.sh
    assert code == 0, out
    for folder in glob.glob(os.path.join(data, "val", "*")):
        for name in sorted(os.listdir(folder))[VAL_IMAGES_PER_CLASS:]:
            os.remove(os.path.join(folder, name))
    code, out = run_bash(shlex.join(["bash", "test/demo.sh", *DEMO_FAST]), repo, env)
    assert code == 0 and "Traceback" not in out and "error:" not in out, out[-6000:]
    assert os.path.isfile(os.path.join(repo, "test", "output", "0", "model_best.pth")), out[-6000:]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(BLOCKS), 4)) as pool:
        futures = {i: pool.submit(run_bash, block, repo, env) for i, block in enumerate(BLOCKS)}
        results = {i: f.result() for i, f in futures.items()}
    return repo, env, results


def test_the_readme_marks_the_blocks_that_run_after_the_quick_start():
    assert len(BLOCKS) >= 4, BLOCKS
    assert any("model_best.pth" in b for b in BLOCKS) and any("metrics.jsonl" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.split("\n")[0][:40] for b in BLOCKS])
def test_a_marked_block_runs_as_written_after_the_quick_start(after_quick_start, index):
    code, out = after_quick_start[2][index]
    shown = f"--- block\n{BLOCKS[index]}\n--- output (exit {code})\n{out[-6000:]}"
    assert code == 0, shown
    assert "Traceback" not in out and "error:" not in out, shown


# 2. Flags ---------------------------------------------------------------------------------------------------

LAUNCHER = re.compile(r"(^|/)test/(train_\w+\.sh|demo\.sh|train_slurm\.sbatch)$")
LAUNCHER_OWN = ("--data_path=", "--epochs=", "--recipe=", "--device_id=")
TOOLS = ("predict.py", "export_onnx.py", "plot_metrics.py", "run_summary.py", "benchmark.py")


def parse(program, args):
    """Parse `args` as `program` does (main.py: config.get_args_parser; benchmark.py: get_args, which only checks
    arguments); None, or the error it prints."""
    module = importlib.import_module({"main.py": "config"}.get(program, program[:-3]))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if program == "benchmark.py":
                module.get_args(args)
            else:
                module.get_args_parser().parse_args(args)
    except SystemExit as e:
        return (stderr.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1] if e.code else None
    return None


def commands(block):
    """Each simple command of a bash block as a list of words (comments, line continuations, `&&`, `|`, `;` and
    leading VAR=value assignments taken out; `...` placeholders dropped)."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command = []
        for word in list(lexer) + [";"]:
            if word and set(word) <= set("&|;()<>"):
                while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            elif word != "...":
                command.append(word)


def checked_commands():
    """(where, program, arguments) of every main.py, launcher and tool command in README.md and docs/*.md."""
    found = []
    for path in DOCS:
        for block in bash_blocks(path):
            for words in commands(block):
                where = f"{os.path.relpath(path, REPO)}: {shlex.join(words)}"
                for i, word in enumerate(words):
                    if os.path.basename(word) == "main.py" or os.path.basename(word) in TOOLS:
                        found.append((where, os.path.basename(word), words[i + 1:]))
                        break
                    if LAUNCHER.search(word):
                        assert os.path.isfile(os.path.join(REPO, word)), f"{where}: no {word}"
                        found.append((where, "main.py", [w for w in words[i + 1:] if not w.startswith(LAUNCHER_OWN)]))
                        break
    return found


def test_every_command_in_the_readme_and_docs_uses_flags_that_exist():
    found = checked_commands()
    assert sum(program == "main.py" for _, program, _ in found) >= 10, found  # the extraction finds them
    problems = []
    for where, program, args in found:
        error = parse(program, args)
        if error:
            problems.append(f"{where}\n    {error}")
    assert not problems, "\n".join(problems)


# 3. Links ---------------------------------------------------------------------------------------------------

def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_in_the_readme_and_docs_leads_somewhere():
    problems = []
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{os.path.relpath(path, REPO)}: ({target})"
            if not os.path.exists(file):
                problems.append(f"{where}: no such file")
            elif anchor and anchor not in anchors(file):
                problems.append(f"{where}: no heading #{anchor} in {os.path.relpath(file, REPO)}")
    assert not problems, "\n".join(problems)
