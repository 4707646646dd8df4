"""The documentation cannot drift from the code: docs/cli.md is what the parsers say, every `dptrain ...` command
quoted in README.md and docs/ parses with the real parser and names real config keys, the Layout lists every module,
and relative links lead to files that exist."""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from dptrain import config as config_mod
from dptrain.cli import build_parser
from dptrain.flags import TRAIN_FLAGS, dest, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "launch" / "README.md", *(ROOT / "docs").glob("*.md")])
SKIP_MARK = "<!-- cli-check: skip -->"  # on the line before a fenced block: its commands are illustrative
MAX_SKIPS = 3  # the marker is for the odd sketch, not a way around this test
# commands whose extra `--section.key=value` arguments are config overrides (the others refuse extras)
OVERRIDE_COMMANDS = ("train", "launch", "bench", "plan", "soak")
# Files other branches add (issue 28: launchers, security, containers, numerics notes). The docs link to them
# already; remove a name here once its file has landed.
PENDING: set[str] = set()


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_md", ROOT / "tools" / "gen_cli_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_md_is_current(monkeypatch):
    """docs/cli.md is regenerated from build_parser and config.py; a flag or key changed without `make docs` fails."""
    gen = _load_generator()
    monkeypatch.setenv("DPTRAIN_RUN_ID", "from-the-environment")  # must not leak into the document
    text = gen.render()
    assert "from-the-environment" not in text
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: run `make docs`"


def test_cli_md_covers_every_command_flag_and_key():
    text = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert f"dptrain {name}" in text
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}`" in text, f"dptrain {name} {opt} missing from docs/cli.md"
    for section in config_mod.dataclasses.fields(config_mod.Config):
        assert f"### [{section.name}]" in text
        for f in config_mod.dataclasses.fields(getattr(config_mod.Config(), section.name)):
            assert f"| `{f.name}` |" in text


def test_every_config_field_is_commented():
    """The README says every setting is a commented key of config.py: hold it to that."""
    gen = _load_generator()
    comments = gen.field_comments((ROOT / "dptrain" / "config.py").read_text())
    hints = config_mod.typing.get_type_hints(config_mod.Config)
    missing = [f"{s.name}.{f.name}" for s in config_mod.dataclasses.fields(config_mod.Config)
               for f in config_mod.dataclasses.fields(hints[s.name])
               if len(comments.get((hints[s.name].__name__, f.name), "")) < 8]
    assert not missing, f"config fields without a comment: {missing}"


# ------------------------------------------------------------------------------------- documented command lines

def _code_lines(text: str):
    """(line number, line, is_code) of a markdown file; fenced blocks after SKIP_MARK are left out."""
    lines = text.splitlines()
    fence, skip, prev_blank, indented = None, False, True, False
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            skip = i >= 2 and lines[i - 2].strip() == SKIP_MARK
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            elif not skip:
                yield i, line, True
            continue
        indented = line.startswith("    ") and (prev_blank or indented) and stripped != ""
        yield i, line, indented
        prev_blank = stripped == ""


def _joined(text: str):
    """Code lines with their `\\` continuations joined, and prose lines, as (line number, text, is_code)."""
    pending = None
    for n, line, code in _code_lines(text):
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip(), True)
            if line.rstrip().endswith("\\") and code:
                pending = (pending[0], pending[1].rstrip()[:-1], True)
                continue
            yield pending
            pending = None
            continue
        if code and line.rstrip().endswith("\\"):
            pending = (n, line.rstrip()[:-1], True)
            continue
        yield n, line, code
    if pending is not None:
        yield pending


_PREFIX_WORDS = {"time", "sudo", "exec"}


def _argv(command: str) -> list[str] | None:
    """The dptrain arguments of a shell line (`dptrain ...`, `python -m dptrain ...`), or None if it runs something
    else. Shell operators end it; `...` and the [ ] of optional parts are dropped."""
    lex = shlex.shlex(command.strip().removeprefix("$ "), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:
        return None
    i = 0
    while i < len(tokens) and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]) or tokens[i] in _PREFIX_WORDS):
        i += 1
    if i < len(tokens) and (tokens[i] == "dptrain" or tokens[i].endswith("/bin/dptrain")):
        i += 1
    elif i + 2 < len(tokens) and Path(tokens[i]).name.startswith("python") and tokens[i + 1:i + 3] == ["-m",
                                                                                                    "dptrain"]:
        i += 3
    else:
        return None
    argv = []
    for tok in tokens[i:]:
        if tok in ("|", "||", ">", ">>", "<", "&&", ";", "&", "2>", "2>&1"):
            break
        if tok.startswith("["):
            tok = tok[1:]
        if tok.endswith("]") and tok.count("[") < tok.count("]"):
            tok = tok[:-1]
        if tok and tok not in ("...", "…"):
            argv.append(tok)
    return argv


def documented_commands():
    """(file:line, argv) of every dptrain command in a code block or an inline `dptrain ...` span."""
    out = []
    for path in DOCS:
        if not path.exists():
            continue
        rel = path.relative_to(ROOT)
        for n, line, code in _joined(path.read_text()):
            spans = [line] if code else re.findall(r"`(dptrain [^`]+)`", line)
            for span in spans:
                argv = _argv(span)
                if not code and (not argv or argv[0].endswith(":")):  # a quoted message, `dptrain agent: ...`
                    continue
                if argv is not None:
                    out.append((f"{rel}:{n}", argv, code))
    return out


class _ParseError(Exception):
    pass


PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # a metavar standing for a value: N, TARGET, FILE


def _sample(action: argparse.Action, text: str) -> str:
    """A value of the right kind for a placeholder such as `--workers N`: the parser still checks the flag."""
    if action.choices is not None:
        return str(list(action.choices)[0])
    if action.type is int or getattr(action.type, "__name__", "") == "worker_count":
        return "2"
    if action.type is float:
        return "0.5"
    return text


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    """The parser of the (sub)command argv names, or None."""
    current, i = parser, 0
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or i >= len(argv) or argv[i] not in subs[0].choices:
            return current if current is not parser else None
        current, i = subs[0].choices[argv[i]], i + 1


def check_command(argv: list[str], inline: bool = False) -> None:
    """Parse argv as `dptrain` would: the real parser, then the `--section.key=value` overrides against Config
    (for `bench --hosts`, the arguments it hands to launch; for `soak --launch-args`, those as launch's).
    Upper-case placeholders after a flag (`--workers N`) stand for a value of the flag's type; in prose a span that
    names a command (`dptrain keys`) or ends with a flag (`dptrain bench --hosts`) refers to it, and only the
    command and flag must exist. Raises _ParseError naming what is wrong."""
    parser = build_parser()
    if "-h" in argv or "--help" in argv:  # the words before it must name a command
        argv = argv[:min(argv.index(h) for h in ("-h", "--help") if h in argv)]
        inline = True
    if not argv:
        return
    sub = _subparser(parser, argv)
    if sub is None:
        raise _ParseError(f"no such command: dptrain {argv[0]}")
    options = sub._option_string_actions
    argv = [_sample(options[argv[i - 1]], tok) if i and PLACEHOLDER.fullmatch(tok) and argv[i - 1] in options
            else tok for i, tok in enumerate(argv)]
    if inline:
        if argv[-1] in options and options[argv[-1]].nargs != 0:  # `dptrain bench --hosts`: the flag itself
            argv = argv[:-1]
        if all(not tok.startswith("-") for tok in argv) and _subparser(parser, argv) is sub:  # only the command
            return

    def error(self, message):
        raise _ParseError(message)

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:
            raise _ParseError(f"parser exited ({e.code})") from None
    finally:
        argparse.ArgumentParser.error = original
    if args.command not in OVERRIDE_COMMANDS:
        if extra:
            raise _ParseError(f"unrecognized arguments: {' '.join(extra)}")
        return
    try:
        if args.command == "bench" and args.hosts:  # the rest goes to launch, short flags included
            from dptrain.bench.hosts import normalize_overrides
            extra = normalize_overrides(extra)
        overrides = parse_overrides(extra)
    except (SystemExit, ValueError) as e:
        raise _ParseError(str(e)) from None
    if args.command in ("train", "launch"):
        for flag, key, *_ in TRAIN_FLAGS:
            v = getattr(args, dest(flag), None)
            if v is not None:
                overrides.setdefault(key, str(v))
    try:
        config_mod.load(None, overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise _ParseError(f"config: {e}") from None
    if args.command == "soak" and args.launch_args:
        check_command(["launch", *shlex.split(args.launch_args)])


def test_documented_commands_parse():
    commands = documented_commands()
    assert len(commands) >= 60, f"only {len(commands)} documented commands found: is the extraction broken?"
    bad = []
    for where, argv, code in commands:
        try:
            check_command(argv, inline=not code)
        except _ParseError as e:
            bad.append(f"{where}: dptrain {shlex.join(argv)}\n    {e}")
    assert not bad, "documented commands that do not parse:\n" + "\n".join(bad)


def test_skip_marker_is_rare():
    uses = sum(path.read_text().count(SKIP_MARK) for path in DOCS if path.exists())
    assert uses <= MAX_SKIPS, f"{uses} blocks skip the command check (at most {MAX_SKIPS})"


@pytest.mark.parametrize("line, problem", [
    ("dptrain launch --transport socket --workers 2", "unknown argument '--transport'"),  # bench's, not launch's
    ("dptrain launch --workers many", "expected an integer or auto"),
    ("dptrain launch --dist.no_such_key=1", "unknown config key"),
    ("dptrain launch --train.lr=fast", "cannot parse"),
    ("dptrain train --timeline t.json", "unknown argument '--timeline'"),  # --timeline is launch's
    ("dptrain keys", "required"),
    ("dptrain agent --connect tcp://10.0.0.1:29500 --no-such-flag", "unrecognized"),
    ("dptrain plan --hosts 2 --wire-dtype float8", "invalid choice"),
])
def test_check_catches(line, problem):
    """The checker itself: each of these is wrong, and is reported as such."""
    with pytest.raises(_ParseError, match=problem):
        check_command(_argv(line))


@pytest.mark.parametrize("line, argv", [
    ("dptrain launch --dist.transport=socket --workers 2   # note", ["launch", "--dist.transport=socket", "--workers",
                                                                    "2"]),
    ("OPENBLAS_CORETYPE=Haswell dptrain bench --threads 1 > out.txt", ["bench", "--threads", "1"]),
    (".venv/bin/python -m dptrain bench [--compare torch] [--model.widths=[8,16]] ...",
     ["bench", "--compare", "torch", "--model.widths=[8,16]"]),
    ("make demo", None),
])
def test_argv_extraction(line, argv):
    assert _argv(line) == argv
    if argv:
        check_command(argv)


# ------------------------------------------------------------------------------------------ layout and links

def test_slow_list_names_real_test_files():
    """conftest's SLOW_FILES/SLOW_TESTS cut the quick tier (make check, docs/contributing.md): a renamed file must not
    drop out of the list and into the quick tier unnoticed."""
    import conftest
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert conftest.SLOW_FILES <= files, conftest.SLOW_FILES - files
    assert all(t.split("::")[0] in files for t in conftest.SLOW_TESTS)


def test_layout_lists_every_module():
    """docs/architecture.md's Layout names every module of the package under its own folder's line, so a
    newcomer's map is complete (a new module without a line there fails)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text[text.index("## Layout"):]
    block = layout[layout.index("```") + 3:]
    block = block[:block.index("```")]
    listed: dict[str, str] = {}
    folder = None
    for line in block.splitlines():
        if line and not line[0].isspace():
            folder, _, line = line.partition(" ")
            listed[folder] = ""
        if folder:
            listed[folder] += " " + line
    missing = []
    for path in sorted((ROOT / "dptrain").rglob("*.py")):
        folder = str(path.parent.relative_to(ROOT)) + "/"
        if path.name == "__init__.py" and folder != "dptrain/":  # a package marker; the folder has its line
            continue
        if not re.search(rf"(?<![\w.]){re.escape(path.name)}(?!\w)", listed.get(folder, "")):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules the Layout does not list under their folder: {missing}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_resolve():
    """Relative links lead to files that exist, and a #fragment to a heading of that file."""
    bad = []
    for path in DOCS:
        if not path.exists():
            continue
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            resolved = (path.parent / target).resolve() if target else path
            rel = resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved
            if not resolved.exists():
                if str(rel) not in PENDING:
                    bad.append(f"{path.relative_to(ROOT)}: {target}")
            elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
                bad.append(f"{path.relative_to(ROOT)}: {target}#{fragment} (no such heading)")
    assert not bad, f"links that lead nowhere: {bad}"
