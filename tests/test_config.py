"""The config parser: every shell form real files use, every bad value, code refused and not run."""

import os
import subprocess
import sys

import pytest

from ksmtuned.core.config import KEYS, Settings, SettingsError, build_settings, parse_assignments, parse_listen
from ksmtuned.service.config_file import check_file_safety, load_config
from ksmtuned.errors import ConfigError, ExitCode

F = "/etc/ksmtuned.conf"


def settings(text: str, env=None) -> Settings:
    return build_settings(parse_assignments(text, F), env or {}, F).settings


@pytest.mark.parametrize("text,key,value", [
    ("KSM_NPAGES_MAX=2000", "npages_max", 2000),
    ("KSM_NPAGES_MAX=2000\n", "npages_max", 2000),
    ("KSM_NPAGES_MAX='2000'", "npages_max", 2000),
    ('KSM_NPAGES_MAX="2000"', "npages_max", 2000),
    ("export KSM_NPAGES_MAX=2000", "npages_max", 2000),
    ("  export\tKSM_NPAGES_MAX=2000  ", "npages_max", 2000),
    ("KSM_NPAGES_MAX=2000 # inline comment", "npages_max", 2000),
    ("KSM_NPAGES_MAX=2000\t#comment", "npages_max", 2000),
    ("KSM_NPAGES_MAX=1\nKSM_NPAGES_MAX=3000", "npages_max", 3000),  # last wins
    ("# KSM_NPAGES_MAX=5\n\n   \nKSM_NPAGES_MAX=700", "npages_max", 700),
    ("KSM_NPAGES_MAX=2000\r\nDEBUG=1\r\n", "npages_max", 2000),     # CRLF
    ("\ufeffKSM_NPAGES_MAX=2000", "npages_max", 2000),               # UTF-8 BOM
    ("KSM_NPAGES_MAX=2''000", "npages_max", 2000),                   # quote concatenation
    ("KSM_NPAGES_MAX=\\2000", "npages_max", 2000),                   # backslash escape
    ("KSM_NPAGES_DECAY=-10", "npages_decay", -10),
    ("KSM_MONITOR_INTERVAL=0.05", "monitor_interval_s", 0.05),
    ("KSM_NPAGES_MAX=", "npages_max", 1250),                          # empty -> default (${X:-1250})
    ("LOGFILE=/var/log/ksmtuned", "logfile", "/var/log/ksmtuned"),
    ('LOGFILE="/var/log/ksm tuned"', "logfile", "/var/log/ksm tuned"),
    ("LOGFILE=/var/log/a#b", "logfile", "/var/log/a#b"),              # '#' inside a word is not a comment
    ('LOGFILE="/a\\"b"', "logfile", '/a"b'),
    ("DEBUG=1", "debug", True),
    ("DEBUG=yes", "debug", True),
    ("DEBUG=0", "debug", False),
    ("DEBUG=", "debug", False),
    ("export DEBUG", "debug", False),                                 # export alone assigns nothing
    ("KSM_PS_METRIC=rsz", "ps_metric", "rss"),
    ("KSM_PS_METRIC=PSS", "ps_metric", "pss"),
    ("KSM_FREE_METRIC=available", "free_metric", "available"),
    ("KSM_GUEST_MATCH='debian, libvirt'", "guest_match", ("debian", "libvirt")),
    ("KSM_GUEST_MATCH=debian,libvirt", "guest_match", ("debian", "libvirt")),
    ("KSM_GUEST_MATCH='regex:^my-vm .*'", "guest_match", ("regex:^my-vm .*",)),
    ("KSM_METRICS_LISTEN=9100", "metrics_listen", ("127.0.0.1", 9100)),
    ("KSM_METRICS_LISTEN=0.0.0.0:9100", "metrics_listen", ("0.0.0.0", 9100)),
    ("KSM_METRICS_LISTEN='[::1]:9100'", "metrics_listen", ("::1", 9100)),
])
def test_shell_forms(text, key, value):
    assert getattr(settings(text), key) == value


def test_defaults_are_the_old_daemons():
    s = settings("")
    assert (s.monitor_interval_s, s.sleep_msec, s.npages_boost, s.npages_decay, s.npages_min, s.npages_max,
            s.thres_coef_pct, s.thres_const_kib) == (60, 10, 300, -50, 64, 1250, 20, 2048)
    assert s.logfile is None and s.debug is False and s.pidfile == "/var/run/ksmtune.pid"


def test_environment_is_used_only_when_the_file_does_not_set_the_key():
    loaded = build_settings(parse_assignments("KSM_NPAGES_MAX=3000", F),
                            {"KSM_NPAGES_MAX": "9", "KSM_NPAGES_MIN": "5", "PIDFILE": "/run/x.pid"}, F)
    assert loaded.settings.npages_max == 3000 and loaded.sources["KSM_NPAGES_MAX"] == f"{F}:1"
    assert loaded.settings.npages_min == 5 and loaded.sources["KSM_NPAGES_MIN"] == "environment"
    assert loaded.settings.pidfile == "/run/x.pid"
    assert loaded.sources["KSM_THRES_COEF"] == "default"


def test_unknown_key_is_a_warning_with_its_line():
    loaded = build_settings(parse_assignments("# c\nKSM_FOO=1\n", F), {}, F)
    assert loaded.warnings == (f"{F}:2: unknown key KSM_FOO (ignored)",)


@pytest.mark.parametrize("text,message", [
    ("KSM_NPAGES_MAX=12OO", f"{F}:1: KSM_NPAGES_MAX: expected an integer, got '12OO'"),
    ("\n\nKSM_THRES_COEF=abc", f"{F}:3: KSM_THRES_COEF: expected an integer, got 'abc'"),
    ("KSM_THRES_COEF=101", f"{F}:1: KSM_THRES_COEF: expected a value less than or equal to 100, got '101'"),
    ("KSM_MONITOR_INTERVAL=0", f"{F}:1: KSM_MONITOR_INTERVAL: expected a value greater than or equal to 0.01, got '0'"),
    # issue 11: 1e-300 made the loop spin
    ("KSM_MONITOR_INTERVAL=1e-300",
     f"{F}:1: KSM_MONITOR_INTERVAL: expected a value greater than or equal to 0.01, got '1e-300'"),
    ("LOGFILE=ksmtuned.log", f"{F}:1: LOGFILE: expected an absolute path, got 'ksmtuned.log'"),
    ("PIDFILE=run/k.pid", f"{F}:1: PIDFILE: expected an absolute path, got 'run/k.pid'"),
    ("LOGFILE=/proc/sysrq-trigger",
     f"{F}:1: LOGFILE: expected a path outside /proc and /sys (writing there tunes the kernel), "
     "got '/proc/sysrq-trigger'"),
    ("LOGFILE=/var/../sys/kernel/mm/ksm/run", f"{F}:1: LOGFILE: expected a path outside /proc and /sys"),
    ("KSM_METRICS_TEXTFILE=/proc/sys/vm/drop_caches", f"{F}:1: KSM_METRICS_TEXTFILE: expected a path outside"),
    ("KSM_MONITOR_INTERVAL=soon", f"{F}:1: KSM_MONITOR_INTERVAL: expected a number, got 'soon'"),
    ("KSM_NPAGES_MIN=-1", f"{F}:1: KSM_NPAGES_MIN: expected a value greater than or equal to 0, got '-1'"),
    ("KSM_NPAGES_DECAY=50", f"{F}:1: KSM_NPAGES_DECAY: expected a value less than or equal to 0, got '50'"),
    ("KSM_NPAGES_MIN=500\nKSM_NPAGES_MAX=100",
     f"{F}:2: KSM_NPAGES_MAX: expected a value >= KSM_NPAGES_MIN (500), got '100'"),
    ("KSM_PS_METRIC=rssi", f"{F}:1: KSM_PS_METRIC: expected 'rss', 'pss' or 'vsz', got 'rssi'"),
    ("KSM_FREE_METRIC=max", f"{F}:1: KSM_FREE_METRIC: expected 'classic' or 'available', got 'max'"),
    ("KSM_GUEST_MATCH=ubuntu", f"{F}:1: KSM_GUEST_MATCH: unknown guest matcher 'ubuntu'"),
    ("KSM_GUEST_MATCH='regex:(['", f"{F}:1: KSM_GUEST_MATCH: invalid regular expression '(['"),
    ("KSM_METRICS_LISTEN=host:99999", f"{F}:1: KSM_METRICS_LISTEN: expected a port number 1-65535"),
    ("KSM_NPAGES_MAX=1 2", f"{F}:1: unexpected text after the value: '2'"),
    ("KSM_NPAGES_MAX='12", f"{F}:1: unterminated single quote"),
    ('KSM_NPAGES_MAX="12', f"{F}:1: unterminated double quote"),
    ("KSM_NPAGES_MAX = 12", f"{F}:1: expected KEY=VALUE"),
    ("KSM_NPAGES_MAX=1\0", f"{F}:1: NUL byte"),
])
def test_bad_values_name_file_line_key(text, message):
    with pytest.raises(ConfigError) as e:
        settings(text)
    assert str(e.value).startswith(message), str(e.value)
    assert e.value.exit_code == ExitCode.CONFIG == 78


CODE_LINES = [
    "KSM_NPAGES_MAX=$(touch {m})",
    "KSM_NPAGES_MAX=`touch {m}`",
    'KSM_NPAGES_MAX="$(touch {m})"',
    'LOGFILE="`touch {m}`"',
    "KSM_NPAGES_MAX=1; touch {m}",
    "KSM_NPAGES_MAX=1 && touch {m}",
    "KSM_NPAGES_MAX=1 | touch {m}",
    "KSM_NPAGES_MAX=1 >{m}",
    "touch {m}",
    "if true; then touch {m}; fi",
    "f() {{ touch {m}; }}",
    "KSM_NPAGES_MAX=$HOME",
    "KSM_NPAGES_MAX=1 touch {m}",
    ". {m}",
]


@pytest.mark.parametrize("line", CODE_LINES)
def test_code_is_refused_with_its_line_and_never_run(tmp_path, line):
    marker = tmp_path / "ran"
    conf = tmp_path / "ksmtuned.conf"
    conf.write_text("# comment\nKSM_NPAGES_MIN=10\n" + line.format(m=marker) + "\n")
    r = subprocess.run([sys.executable, "-m", "ksmtuned", "check-config", "--config", str(conf),
                        "--insecure-config"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78, r.stderr
    assert f"{conf}:3:" in r.stderr
    assert not marker.exists()
    # bash itself WOULD run these: the refusal is what protects the host
    if line.startswith(("KSM_NPAGES_MAX=$(", "KSM_NPAGES_MAX=1;", "touch")):
        subprocess.run(["bash", "-c", f". {conf}"], capture_output=True, timeout=10)
        assert marker.exists()


def test_missing_file_means_defaults(tmp_path):
    loaded = load_config(tmp_path / "none.conf", env={})
    assert loaded.settings == Settings() and not loaded.file_found


def test_unreadable_utf8_names_the_line(tmp_path):
    p = tmp_path / "c.conf"
    p.write_bytes(b"KSM_NPAGES_MIN=1\nLOGFILE=\xff\n")
    with pytest.raises(ConfigError, match=f"{p}:2: not valid UTF-8"):
        load_config(p, env={})


def test_settings_are_frozen():
    s = settings("")
    with pytest.raises(Exception):
        s.npages_max = 5


@pytest.mark.parametrize("text,expected", [("9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
                                           ("", None), ("10.0.0.1:80", ("10.0.0.1", 80))])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files owned by others")
@pytest.mark.parametrize("mode,owner,message", [
    (0o666, 0, "writable by group or others (mode 666); fix with: chmod go-w"),
    (0o620, 0, "writable by group or others"),
    (0o644, 65534, "owned by uid 65534, not root; fix with: chown root"),
])
def test_unsafe_config_is_refused(tmp_path, mode, owner, message):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    p = d / "ksmtuned.conf"
    p.write_text("KSM_NPAGES_MAX=10\n")
    os.chmod(p, mode)
    os.chown(p, owner, 0)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_file_safety(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_world_writable_directory_is_refused(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    os.chmod(d, 0o777)
    (d / "ksmtuned.conf").write_text("")
    with pytest.raises(ConfigError, match=f"{d}: config directory is writable"):
        check_file_safety(d / "ksmtuned.conf")


# --- the settings model: numbers as the old daemon's bash reads them --------------------------

@pytest.mark.parametrize("text,value", [
    ("KSM_NPAGES_BOOST=' 12 '", 12), ("KSM_NPAGES_BOOST=+12", 12), ("KSM_NPAGES_BOOST=0", 0),
    ("KSM_NPAGES_DECAY=-0", 0), ("KSM_MONITOR_INTERVAL=1e1", 10.0), ("KSM_MONITOR_INTERVAL=.5", 0.5),
    ("KSM_MONITOR_INTERVAL=5.", 5.0), ("KSM_MONITOR_INTERVAL=' 2 '", 2.0),
])
def test_numbers_bash_and_sleep_read_alike_are_accepted(text, value):
    s = settings(text)
    assert getattr(s, KEYS[text.split("=")[0]]) == value


@pytest.mark.parametrize("text,message", [
    # bash's $(( )) reads 012 as octal 10: refused rather than silently read otherwise
    ("KSM_NPAGES_BOOST=012", "KSM_NPAGES_BOOST: expected a decimal integer without leading zeros"),
    ("KSM_NPAGES_BOOST=1_000", "KSM_NPAGES_BOOST: expected an integer, got '1_000'"),
    ("KSM_NPAGES_BOOST=12.0", "KSM_NPAGES_BOOST: expected an integer, got '12.0'"),
    ("KSM_NPAGES_BOOST=0x10", "KSM_NPAGES_BOOST: expected an integer, got '0x10'"),
    ("KSM_NPAGES_BOOST=\u0663", "KSM_NPAGES_BOOST: expected an integer"),  # an Arabic-Indic 3
    ("KSM_NPAGES_BOOST=2147483648", "KSM_NPAGES_BOOST: expected a value less than or equal to 2147483647"),
    ("KSM_MONITOR_INTERVAL=inf", "KSM_MONITOR_INTERVAL: expected a number, got 'inf'"),
    ("KSM_MONITOR_INTERVAL=nan", "KSM_MONITOR_INTERVAL: expected a number, got 'nan'"),
    ("KSM_MONITOR_INTERVAL=1_0", "KSM_MONITOR_INTERVAL: expected a number, got '1_0'"),
    ("KSM_MONITOR_INTERVAL=1e-400", "KSM_MONITOR_INTERVAL: expected a value greater than or equal to 0.01"),
    ("KSM_MONITOR_INTERVAL=86401", "KSM_MONITOR_INTERVAL: expected a value less than or equal to 86400"),
])
def test_numbers_the_old_daemon_would_misread_are_refused(text, message):
    with pytest.raises(ConfigError) as e:
        settings(text)
    assert str(e.value).startswith(f"{F}:1: {message}"), str(e.value)


def test_every_bad_value_is_reported_at_once_each_with_its_line():
    with pytest.raises(ConfigError) as e:
        settings("KSM_NPAGES_MAX=x\nKSM_THRES_COEF=101\nKSM_PS_METRIC=foo\n")
    assert str(e.value).splitlines() == [
        f"{F}:1: KSM_NPAGES_MAX: expected an integer, got 'x'",
        f"{F}:2: KSM_THRES_COEF: expected a value less than or equal to 100, got '101'",
        f"{F}:3: KSM_PS_METRIC: expected 'rss', 'pss' or 'vsz', got 'foo'",
    ]


def test_the_model_checks_values_however_it_is_built():
    """Direct construction (as the daemon's code and tests do) validates like the file does."""
    assert Settings(npages_boost="7").npages_boost == 7
    with pytest.raises(SettingsError) as e:
        Settings(npages_min=100, npages_max=10)
    assert e.value.problems == [(None, "KSM_NPAGES_MAX (10) must be >= KSM_NPAGES_MIN (100)")]
    with pytest.raises(SettingsError) as e:
        Settings.from_aliases({"KSM_THRES_COEF": -1, "KSM_NPAGES_BOOST": "x"})
    assert [a for a, _ in e.value.problems] == ["KSM_THRES_COEF", "KSM_NPAGES_BOOST"]
    with pytest.raises(SettingsError, match="unknown keys KSM_NOPE"):
        Settings.from_aliases({"KSM_NOPE": 1})


def test_settings_by_alias_is_every_key_as_json():
    import json

    s = settings("KSM_GUEST_MATCH=debian,libvirt\nKSM_METRICS_LISTEN=9100\nDEBUG=1\n")
    d = s.by_alias()
    assert set(d) == set(KEYS)
    assert d["KSM_GUEST_MATCH"] == ["debian", "libvirt"] and d["KSM_METRICS_LISTEN"] == ["127.0.0.1", 9100]
    assert d["DEBUG"] is True and d["KSM_MONITOR_INTERVAL"] == 60.0
    assert json.loads(json.dumps(d)) == d
    assert Settings.from_aliases({k: v for k, v in d.items()
                                  if k not in ("KSM_GUEST_MATCH", "KSM_METRICS_LISTEN")}).npages_max == 1250
