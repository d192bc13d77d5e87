import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from train.run_guard import (OutputNotWritableError, RunLock, RunLockedError,
                             check_output_writable)


def test_second_run_into_same_folder_is_refused_with_owner(tmp_path):
    with RunLock(tmp_path):
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_other_host_is_respected(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-node"}))
    with pytest.raises(RunLockedError, match="another-node"):
        RunLock(tmp_path).acquire()


def test_read_only_and_full_disk_fail_early(tmp_path):
    check_output_writable(tmp_path / "ok", need_bytes=1024)
    with pytest.raises(OutputNotWritableError, match="free some space"):
        check_output_writable(tmp_path, need_bytes=1 << 60)
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputNotWritableError, match="cannot write there"):
            check_output_writable(ro, need_bytes=1)
    with pytest.raises(OutputNotWritableError, match="cannot write there"):
        check_output_writable("/proc/wanlora-test", need_bytes=1)


def test_first_signal_requests_stop_second_exits_now(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from train.run_guard import GracefulStop
        with GracefulStop() as stop:
            print("ready", flush=True)
            while not stop.stop:
                time.sleep(0.01)
            print("stopping cleanly", flush=True)
            time.sleep(30)  # a long checkpoint write; a second signal must cut it short
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "stopping cleanly"
    start = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 128 + signal.SIGINT
    assert time.time() - start < 5
