"""The JSON documents: their committed JSON Schemas match the models, every command's --json
output reads back through its model, and `status` meets a state file that is not one --
truncated, of the wrong types, NaN, 1e400, nested 100k deep, huge, a FIFO, a device, a link,
planted by another user -- with one line on stderr and exit 65, never a traceback or a hang."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ksmtuned.core.documents import (DOCUMENTS, CheckConfigDocument, CheckDocument, GuestsDocument, StateDocument,
                                     StatusDocument)
from tests.report_support import REPO, fake_ksm_dir, running

SCHEMAS = REPO / "docs" / "schemas"
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def _normal(node):
    """A schema with what pydantic minors spell differently but means the same taken out:
    ``"additionalProperties": true`` (JSON Schema's default); 0 and 0.0 compare equal anyway."""
    if isinstance(node, dict):
        return {k: _normal(v) for k, v in node.items() if not (k == "additionalProperties" and v is True)}
    if isinstance(node, list):
        return [_normal(v) for v in node]
    return node


def test_committed_schemas_are_generated_from_the_models():
    sys.path.insert(0, str(REPO / "tools"))
    gen = __import__("gen-schemas")
    rendered = gen.rendered()
    assert sorted(rendered) == sorted(p.name for p in SCHEMAS.glob("*.json")) == sorted(DOCUMENTS)
    for name, text in rendered.items():
        committed = json.loads((SCHEMAS / name).read_text())
        assert _normal(committed) == _normal(json.loads(text)), f"{name} is stale: run python3 tools/gen-schemas.py"


def test_every_schema_names_its_version_and_documents_the_settings():
    for name in DOCUMENTS:
        schema = json.loads((SCHEMAS / name).read_text())
        assert schema["properties"]["schema"]["const"] == 1, name
    settings = json.loads((SCHEMAS / "check-config.json").read_text())["$defs"]["Settings"]["properties"]
    assert settings["KSM_THRES_COEF"]["maximum"] == 100 and settings["KSM_THRES_COEF"]["unit"] == "% of RAM"
    assert settings["KSM_PS_METRIC"]["enum"] == ["rss", "pss", "vsz"]


def _cli(*args: str, timeout: float = 30, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "ksmtuned", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_each_command_s_json_reads_back_through_its_model(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_NPAGES_MAX=2000\nKSM_FOO=1\n")
    r = _cli("check-config", "--json", "--config", str(conf), "--insecure-config")
    assert r.returncode == 0, r.stderr
    doc = CheckConfigDocument.model_validate_json(r.stdout)
    assert doc.settings.npages_max == 2000 and doc.sources["KSM_NPAGES_MAX"] == f"{conf}:1"
    assert doc.warnings == [f"{conf}:2: unknown key KSM_FOO (ignored)"] and doc.file_found
    assert json.loads(r.stdout)["settings"]["KSM_NPAGES_MAX"] == 2000  # by the ksmtuned.conf keys
    sysfs = fake_ksm_dir(tmp_path)
    common = ["--config", str(conf), "--insecure-config", "--sysfs", str(sysfs), "--pidfile", str(tmp_path / "no.pid")]
    r = _cli("guests", "--json", *common)
    assert r.returncode == 0, r.stderr
    assert GuestsDocument.model_validate_json(r.stdout).metric == "rss"
    r = _cli("check", "--json", *common, timeout=60)
    assert r.returncode in (0, 5), r.stderr  # 5: a host check failed (1 would be a crash)
    assert {c.name for c in CheckDocument.model_validate_json(r.stdout).checks} >= {"memory_overcommit", "ksm"}
    r = _cli("status", "--json", *common, "--state-file", str(tmp_path / "none.json"))
    assert r.returncode == 0, r.stderr
    status = StatusDocument.model_validate_json(r.stdout)
    assert not status.daemon.running and status.ksm.counters["pages_sharing"] == 56789


def test_bad_config_with_json_is_still_one_line_per_value_and_78(tmp_path):
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("KSM_NPAGES_MAX=x\nKSM_THRES_COEF=101\n")
    r = _cli("check-config", "--json", "--config", str(conf), "--insecure-config")
    assert r.returncode == 78 and r.stdout == ""
    assert r.stderr.splitlines() == [f"ksmtuned: {conf}:1: KSM_NPAGES_MAX: expected an integer, got 'x'",
                                     f"{conf}:2: KSM_THRES_COEF: expected a value less than or equal to 100, got '101'"]


# --- status and the daemon's start on a state file that is not one ---------------------------

@pytest.fixture(scope="module")
def real_state(tmp_path_factory) -> dict:
    """A state file as a real daemon wrote it (after one tick), as a dict to mutate."""
    tmp = tmp_path_factory.mktemp("daemon")
    with running(tmp, "KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n") as d:
        st = d.wait_adjusts(1)
    StateDocument.model_validate(st)  # what the daemon writes is what status reads
    return st


def _with(doc: dict, path: tuple, value) -> str:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return json.dumps(doc)


def _status(tmp_path: Path, state: Path, *more: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    sysfs = tmp_path / "mm" / "ksm"
    if not sysfs.exists():
        fake_ksm_dir(tmp_path)
    return _cli("status", "--sysfs", str(sysfs), "--pidfile", str(tmp_path / "no.pid"), "--state-file", str(state),
                *more, timeout=20, prefix=prefix)


def _refused(r: subprocess.CompletedProcess, state: Path, why: str) -> None:
    assert r.returncode == 65, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ksmtuned: {state}: "), r.stderr
    assert why in lines[0], lines[0]
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])


BAD_TEXTS = {
    "truncated": (lambda st: json.dumps(st)[:200], "Invalid JSON: EOF while parsing"),
    "empty": (lambda st: "", "Invalid JSON"),
    "not an object": (lambda st: "[1, 2]", "Input should be an object"),
    "wrong type": (lambda st: _with(st, ("daemon", "pid"), "one"), "daemon.pid: Input should be a valid integer"),
    "NaN": (lambda st: _with(st, ("time",), 0).replace('"time": 0', '"time": NaN'), "time: Input should be a finite"),
    "1e400": (lambda st: _with(st, ("duration_s",), 0).replace('"duration_s": 0', '"duration_s": 1e400'),
              "duration_s: Input should be a finite"),
    "huge integer": (lambda st: _with(st, ("npages",), 0).replace('"npages": 0', '"npages": ' + "9" * 5000),
                     "number out of range"),
    "100k deep": (lambda st: _with(st, ("guests",), 0).replace('"guests": 0', '"guests": ' + "[" * 100_000),
                  "recursion limit exceeded"),
    "another schema": (lambda st: _with(st, ("schema",), 2), "schema: Input should be 1"),
    "a bad setting": (lambda st: _with(st, ("settings", "KSM_THRES_COEF"), 101),
                      "settings: KSM_THRES_COEF: expected a value less than or equal to 100"),
    "escape sequences in a key": (lambda st: _with(st, ("ksm", "\x1b]0;pwned\x07\r"), 1.5), "\\x1b]0;pwned\\x07\\r"),
    "not UTF-8": (lambda st: "\udcff", "Invalid JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_status_refuses_a_bad_state_file_in_one_line(tmp_path, real_state, kind):
    make, why = BAD_TEXTS[kind]
    state = tmp_path / "state.json"
    state.write_bytes(make(real_state).encode("utf-8", "surrogateescape"))
    for more in ((), ("--json",)):
        _refused(_status(tmp_path, state, *more), state, why)


def test_the_real_state_file_and_its_round_trip_are_accepted(tmp_path, real_state):
    state = tmp_path / "state.json"
    state.write_text(json.dumps(real_state))
    r = _status(tmp_path, state)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no daemon runs: shown as not running
    assert StateDocument.model_validate_json(state.read_bytes()).model_dump(mode="json", by_alias=True) == real_state


def test_status_refuses_files_that_are_not_regular_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    _refused(_status(tmp_path, fifo), fifo, "not a regular file")  # a FIFO: no writer, no hang
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    _refused(_status(tmp_path, link), link, "a symbolic link")
    directory = tmp_path / "dir.json"
    directory.mkdir()
    _refused(_status(tmp_path, directory), directory, "not a regular file")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB of NUL bytes, read only up to the limit
    _refused(_status(tmp_path, huge), huge, "larger than")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a character device")
def test_status_refuses_a_device_as_the_state_file(tmp_path):
    zero = tmp_path / "zero.json"
    os.mknod(zero, 0o20644, os.makedev(1, 5))  # /dev/zero: endless, never read
    _refused(_status(tmp_path, zero), zero, "not a regular file")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("plant", ["fifo", "deep", "garbage"])
def test_a_state_file_planted_by_nobody_in_a_sticky_directory(tmp_path, plant):
    """`--state-file /tmp/x.json` (any world-writable directory): nobody plants the file before
    the daemon writes it; root's `status` refuses it in one line, and the daemon's start logs it,
    ignores it and replaces it."""
    from tests.conftest import skip_unless_nobody_can_run_python

    skip_unless_nobody_can_run_python()
    sticky = Path(tempfile.mkdtemp(prefix="ksmtuned-sticky-", dir="/tmp"))
    try:
        sticky.chmod(0o1777)
        state = sticky / "state.json"
        planter = {"fifo": f"import os; os.mkfifo({str(state)!r})",
                   "deep": f"open({str(state)!r}, 'w').write('[' * 100000)",
                   "garbage": f"open({str(state)!r}, 'w').write('{{\"schema\": 1, \"daemon\": 7}}')"}[plant]
        r = subprocess.run([*AS_NOBODY, "/usr/bin/python3", "-c", planter], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and state.stat().st_uid != 0, r.stderr
        why = {"fifo": "not a regular file", "deep": "Invalid JSON", "garbage": "Input should be"}[plant]
        _refused(_status(tmp_path, state), state, why)
        fake_ksm_dir(sticky)  # readable by nobody, unlike tmp_path
        r = _status(sticky, state, prefix=AS_NOBODY)  # and for the user who planted it, the same
        _refused(r, state, why)
    finally:
        shutil.rmtree(sticky, ignore_errors=True)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"schema": 1, "history": [{"t": NaN}]}', '{"schema": 7}'])
def test_the_daemon_starts_on_a_bad_old_state_file_and_replaces_it(tmp_path, text):
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir()
    state.write_text(text)
    with running(tmp_path, "KSM_MONITOR_INTERVAL=3600\n", state=state) as d:
        st = d.wait_adjusts(1)
        assert len(st["history"]) == 1  # nothing carried over
        log = d.stderr.read_text()
        assert f"{state}: not a ksmtuned state file" in log and "starting with an empty history" in log, log
        assert "Traceback" not in log
    StateDocument.model_validate_json(state.read_bytes())
