"""systemd's notify protocol, spoken to a real NOTIFY_SOCKET (as systemd would listen)."""

import os
import signal
import socket
import subprocess
import sys
import time

from tests.daemon_support import fake_ksm_dir


def recv_all(sock: socket.socket, until: str, timeout_s: float = 10.0) -> list[str]:
    messages = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if any(until in m for m in messages):
            break
    return messages


def test_ready_status_watchdog_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    conf = tmp_path / "c.conf"
    conf.write_text("KSM_THRES_COEF=100\nKSM_MONITOR_INTERVAL=3600\n")
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    p = subprocess.Popen([sys.executable, "-m", "ksmtuned", "--foreground", "--force", "--insecure-config",
                          "--config", str(conf), "--sysfs", str(fake_ksm_dir(tmp_path)),
                          "--pidfile", str(tmp_path / "pid")], env=env, stderr=subprocess.DEVNULL)
    try:
        first = recv_all(sock, "READY=1")
        ready = [m for m in first if "READY=1" in m]
        assert ready, first
        assert "STATUS=KSM on, boosting to 300 pages/10 ms" in ready[0]
        # READY comes after the first adjust: the knobs are already written
        assert (tmp_path / "ksm" / "pages_to_scan").read_text() == "300"
        # the watchdog is fed from the loop, at least every WATCHDOG_USEC / 2, with no tick due
        pings = [m for m in recv_all(sock, "never", timeout_s=0.65) if m == "WATCHDOG=1"]
        assert len(pings) >= 3, pings
        os.kill(p.pid, signal.SIGUSR1)
        assert any("STATUS=KSM on, boosting to 600" in m for m in recv_all(sock, "boosting to 600"))
        os.kill(p.pid, signal.SIGHUP)
        reload_msgs = recv_all(sock, "READY=1")
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in reload_msgs), reload_msgs
        assert any("READY=1" in m for m in reload_msgs), reload_msgs  # else systemd stays "reloading"
        os.kill(p.pid, signal.SIGTERM)
        assert any("STOPPING=1" in m for m in recv_all(sock, "STOPPING=1"))
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        sock.close()


def test_silent_without_notify_socket(tmp_path):
    """Outside systemd nothing is sent and nothing fails."""
    from ksmtuned.service.notify import Notifier

    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    n.ready("x")
    n.watchdog()
