"""Bad input, fuzzed: the config parser, the meminfo parser and the command line.

Property: any input either parses or raises the one documented error (ConfigError for the
config, MeminfoError for meminfo, an argparse usage error = exit 2 for the command line) with
a "file:line: " message; never another exception, never a hang (each example runs under a
10 s alarm).  Real config files hold inline comments, ``export``, quotes, CRLF line ends, a
UTF-8 byte-order mark, very long lines and the odd NUL byte: the strategies build lines from
those pieces.  Where our parser accepts a config, bash ``source`` must read the same values:
a differential test against the old daemon's way of reading the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings, strategies as st

from ksmtuned.core import config
from ksmtuned.cli import build_parser, main
from ksmtuned.errors import ConfigError, ExitCode
from tests.faultrig import make_procfs, make_sysfs

F = "/etc/ksmtuned.conf"
M = "/proc/meminfo"
CONFIG_LOC = re.compile(r"^/etc/ksmtuned\.conf:(\d+): \S")
MEMINFO_LOC = re.compile(r"^/proc/meminfo:(\d+): \S")

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail the example (instead of the whole run hanging) if it takes longer than ``seconds``."""
    def on_alarm(signo, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- config text ------------------------------------------------------------------------------

PIECES = [
    "KSM_NPAGES_MAX=", "KSM_MONITOR_INTERVAL=", "DEBUG=", "LOGFILE=", "KSM_GUEST_MATCH=", "KSM_THRES_COEF=",
    "KSM_METRICS_LISTEN=", "KSM_PS_METRIC=", "KSM_NPAGES_DECAY=", "FOO=", "export ", "export", "#", " # note",
    "'", '"', "\\", "$(", "$", "`", ";", "|", "&&", "&", ">", "<", "(", ")", "{", "}", "=", " ", "\t", "\r",
    "\ufeff", "\0", "1250", "12O0", "-50", "0.05", "1e3", "yes", "no", "rss", "pss", "available", "9100",
    "[::1]:9100", "regex:(", "regex:^qemu", "redhat,debian", "/var/log/ksmtuned", "~", "*", "é", "\u2028",
    "\x0b", "\x85", "\x1c", "9" * 40,
]
piece = st.one_of(st.sampled_from(PIECES), st.text(max_size=4))
line = st.lists(piece, max_size=10).map("".join)


@st.composite
def config_texts(draw):
    lines = draw(st.lists(line, max_size=12))
    if draw(st.booleans()):  # a very long line somewhere
        lines.insert(draw(st.integers(0, len(lines))),
                     draw(st.sampled_from(["KSM_NPAGES_MAX=", "LOGFILE=", "#", "X"])) + "9" * draw(st.integers(1, 200_000)))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines)
    if draw(st.booleans()):
        text += eol
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


def _line_count(text: str) -> int:
    return text.count("\n") + 1


@FUZZ
@given(config_texts())
@example("KSM_NPAGES_MAX=1250 # inline comment\r\nexport DEBUG=1\r\n")
@example("\ufeffKSM_NPAGES_MAX='12'\"50\"\nLOGFILE=/var/log/ksm\\ tuned\n")
@example("KSM_NPAGES_MAX=\0\n")
@example("KSM_NPAGES_MAX=" + "9" * 100_000)
@example("KSM_MONITOR_INTERVAL=nan\nKSM_MONITOR_INTERVAL=inf")
@example("KSM_GUEST_MATCH='regex:('")
def test_config_text_parses_or_names_its_line(text):
    with no_hang():
        try:
            assignments = config.parse_assignments(text, F)
        except ConfigError as e:
            m = CONFIG_LOC.match(str(e))
            assert m, str(e)
            assert 1 <= int(m.group(1)) <= _line_count(text)
            return
        for a in assignments:
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a.key)
            assert 1 <= a.line_no <= _line_count(text)
            assert "\0" not in a.value
        try:
            loaded = config.build_settings(assignments, {}, F)
        except ConfigError as e:
            for problem in str(e).splitlines():
                assert re.match(r"^/etc/ksmtuned\.conf(:\d+)?: \S", problem), problem
            return
        assert isinstance(loaded.settings, config.Settings)
        for w in loaded.warnings:
            assert CONFIG_LOC.match(w), w


# any value, quoted as a shell would quote it, reads back unchanged
value_text = st.text(st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)), max_size=60)


@FUZZ
@given(value_text, st.sampled_from(["", "export ", "  "]), st.sampled_from(["", " # comment", "\t#"]))
def test_a_shell_quoted_value_reads_back_unchanged(value, prefix, comment):
    text = f"{prefix}LOGFILE={shlex.quote(value)}{comment}\n"
    [a] = config.parse_assignments(text, F)
    assert (a.key, a.value, a.line_no) == ("LOGFILE", value, 1)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(config.KEYS)), st.text(max_size=30), max_size=6))
def test_environment_values_are_validated_like_the_file(env):
    with no_hang():
        try:
            loaded = config.build_settings([], env, F)
        except ConfigError as e:
            for problem in str(e).splitlines():
                assert problem.startswith(f"{F}: environment: ") or problem.startswith(f"{F}: default: "), problem
            return
        assert isinstance(loaded.settings, config.Settings)


# --- the old daemon read the file with bash: where we accept it, the values must agree ----------

SAFE_PIECES = ["KSM_NPAGES_MAX=", "LOGFILE=", "DEBUG=", "export ", "#", " # c", "'", '"', "\\", " ", "\t",
               "a", "1", "-", "/", ".", ":", ",", "#", "=", "_", "*", "?", "[", "]", "{", "}", "~", "!", "%", "^",
               "+", "@"]
VALUE_PIECES = ["'", '"', "\\", "a", "1", "-", "/", ".", ":", ",", "#", "=", "_", "*", "?", "[", "]", "{", "}",
                "~", "!", "%", "^", "+", "@", " ", "\t", "''", '""', "'a b'", '"a b"', "\\ ", "\\#", "\\'"]
assignment_line = st.builds(
    lambda prefix, key, value, comment: f"{prefix}{key}={value}{comment}",
    st.sampled_from(["", " ", "\t", "export ", " export  "]),
    st.sampled_from(["KSM_NPAGES_MAX", "LOGFILE", "DEBUG", "A_1"]),
    st.lists(st.sampled_from(VALUE_PIECES), max_size=6).map("".join),
    st.sampled_from(["", " # c", "\t#x", " #", "#"]),
)
safe_line = st.one_of(assignment_line, assignment_line, st.lists(st.sampled_from(SAFE_PIECES), max_size=8).map("".join))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs bash as nobody, which needs root")
@settings(max_examples=int(os.environ.get("KSMTUNED_FUZZ_BASH", 150)), deadline=None, database=None)
@given(st.lists(safe_line, min_size=1, max_size=4))
def test_accepted_config_reads_as_bash_reads_it(lines):
    text = "\n".join(lines) + "\n"
    try:
        assignments = config.parse_assignments(text, F)
    except ConfigError:
        return  # refused: bash's reading does not matter
    ours = {a.key: a.value for a in assignments if a.key != "_"}
    keys = sorted({a.key for a in assignments} - {"_"})  # $_ is bash's last argument, not data
    assume(keys)
    event("accepted, compared with bash")
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        conf = Path(d) / "c.conf"
        conf.write_text(text)
        conf.chmod(0o644)
        script = f"set -f; source {conf} >/dev/null 2>&1 || exit 99; " + "; ".join(
            f'printf "%s\\0" "${{{k}-<unset>}}"' for k in keys)
        # as nobody, in an empty directory: an accepted file must run nothing, but if it did...
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                            "env", "-i", "HOME=/nonexistent", "bash", "--norc", "--noprofile", "-c", script],
                           capture_output=True, cwd=d, timeout=10)
    assert r.returncode == 0, (text, r.returncode, r.stderr)
    theirs = dict(zip(keys, r.stdout.decode().split("\0")))
    assert ours == theirs, text


@pytest.mark.parametrize("text, value_or_error", [
    ("LOGFILE=/var/log/ksm\\ ", "/var/log/ksm "),      # an escaped space ends the line: it is kept
    ("LOGFILE=/var/log/ksm\\\nDEBUG=1", ":1: a backslash at the end of a line"),  # bash: LOGFILE=...DEBUG=1
    ("LOGFILE=~/ksm.log", ":1: refusing '~'"),          # bash: /root/ksm.log
    ("LOGFILE=/a:~/b", ":1: refusing '~'"),             # bash expands after an unquoted ':' too
    ("LOGFILE='~/ksm.log'", "~/ksm.log"),
    ("LOGFILE=a~b", "a~b"),
    ("LOGFILE=\\~", "~"),
])
def test_differences_from_bash_that_the_differential_test_found(text, value_or_error):
    """Each row was a counterexample of test_accepted_config_reads_as_bash_reads_it."""
    try:
        [a] = config.parse_assignments(text, F)
    except ConfigError as e:
        assert value_or_error in str(e)
        return
    assert a.value == value_or_error


# --- /proc/meminfo ----------------------------------------------------------------------------

REAL_MEMINFO = Path("/proc/meminfo").read_text()
REAL_LINES = REAL_MEMINFO.splitlines()


@st.composite
def meminfo_texts(draw):
    lines = list(REAL_LINES)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["drop", "dup", "garbage", "prefix", "number", "unit", "blank", "swap"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if not lines:
            break
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "garbage":
            lines.insert(i, draw(st.text(max_size=40)))
        elif op == "prefix":
            lines[i] = draw(st.text(min_size=1, max_size=3)) + lines[i]
        elif op == "number":
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.one_of(st.integers(-10, 2**70).map(str), st.text(max_size=8)))} kB"
        elif op == "unit":
            lines[i] = lines[i].replace("kB", draw(st.sampled_from(["", "KB", "MB", "kB kB", "B"])))
        elif op == "blank":
            lines[i] = ""
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n", "\0"]))


# --- the command line -------------------------------------------------------------------------

ARG_PIECES = ["--foreground", "--config", "--debug", "--once", "--dry-run", "--sysfs", "--procfs", "--pidfile",
              "--insecure-config", "--force", "--version", "--state-file", "--json", "--quiet", "retune",
              "check-config", "guests", "status", "check", "-", "--", "--conf", "--con=", "-x", "=", "",
              "/nonexistent", "é", "\x7f", "-h"]
argv_lists = st.lists(st.one_of(st.sampled_from(ARG_PIECES), st.text(max_size=6)), max_size=8)


@FUZZ
@given(argv_lists)
def test_any_argv_parses_or_is_a_usage_error(argv):
    with no_hang(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            wants_help = any(a in ("-h", "--help") or (len(a) > 2 and "--help".startswith(a)) for a in argv)
            assert e.code == ExitCode.USAGE or (e.code == 0 and wants_help), (e.code, argv)
            if e.code == ExitCode.USAGE:
                assert "usage:" in err.getvalue() and "error:" in err.getvalue()
            return
    assert args.command in (None, "retune", "check-config", "guests", "status", "check")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _run_main(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


CLI_FUZZ = settings(FUZZ, max_examples=60)


@CLI_FUZZ
@given(config_texts())
def test_check_config_exits_0_or_78_with_the_line(tmp_path_factory, restore_logging, text):
    d = tmp_path_factory.mktemp("cfg")
    conf = d / "ksmtuned.conf"
    conf.write_bytes(text.encode("utf-8", "surrogatepass"))
    conf.chmod(0o644)
    code, out, err = _run_main(["check-config", "--config", str(conf)])
    assert code in (ExitCode.OK, ExitCode.CONFIG), (code, err)
    if code == ExitCode.CONFIG:
        first = err.splitlines()[0]
        assert first.startswith(f"ksmtuned: {conf}"), first
        assert "Traceback" not in err


@CLI_FUZZ
@given(st.one_of(meminfo_texts(), st.text(max_size=200)), config_texts())
def test_once_dry_run_with_any_meminfo_and_config_gives_a_documented_exit(tmp_path_factory, restore_logging,
                                                                          meminfo_text, text):
    d = tmp_path_factory.mktemp("once")
    conf = d / "ksmtuned.conf"
    conf.write_bytes(text.encode("utf-8", "surrogatepass"))
    conf.chmod(0o644)
    sysfs = make_sysfs(d / "ksm")
    procfs = make_procfs(d / "proc")
    (procfs / "meminfo").write_text(meminfo_text, errors="surrogatepass")
    code, out, err = _run_main(["--once", "--dry-run", "--config", str(conf), "--sysfs", str(sysfs),
                                "--procfs", str(procfs), "--pidfile", str(d / "pid")])
    assert code in set(ExitCode), (code, err)
    assert "Traceback" not in err
    if code not in (ExitCode.OK,):
        # "ksmtuned: FILE:LINE: ..." (refused at start) or "ERROR: adjust failed (once) ...: FILE: ..." (the tick)
        assert re.search(rf"(ksmtuned|adjust failed \(once\)).*: ({re.escape(str(conf))}|{re.escape(str(procfs))}/meminfo)",
                         err), err
    knobs = {p.name: p.read_text() for p in sysfs.iterdir()}
    assert knobs == {"run": "0\n", "pages_to_scan": "100\n", "sleep_millisecs": "20\n"}  # dry run: untouched


@CLI_FUZZ
@given(st.one_of(st.binary(max_size=30), st.sampled_from([b"1\n", b"%d\n" % os.getpid(), b"%d" % os.getppid(),
                                                          b"-1", b"0", b"99999999999999999999", b" 1 "])))
def test_retune_never_signals_what_a_pid_file_names(tmp_path_factory, restore_logging, content):
    """A pid file naming pid 1, this test process or its parent: nothing is signalled, exit 3."""
    d = tmp_path_factory.mktemp("retune")
    pidfile = d / "ksmtune.pid"
    pidfile.write_bytes(content)
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        code, out, err = _run_main(["retune", "--pidfile", str(pidfile)])
        assert code == ExitCode.NOT_RUNNING, (code, err)
        assert err.startswith("ksmtuned: ksmtuned is not running")
        code, out, err = _run_main(["retune", "--quiet", "--pidfile", str(pidfile)])
        assert code == ExitCode.OK and not err
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert not got
