"""Offline by construction: no test can reach the network, neither in the suite's process nor in the processes
it starts (the CLI, sweep jobs, workers), so a passing suite shows every path runs without one."""

import socket
import subprocess
import sys

import pytest
from pytest_socket import SocketBlockedError


def test_the_suite_process_refuses_internet_sockets():
    with pytest.raises(SocketBlockedError):
        socket.create_connection(("pypi.org", 443), timeout=1)
    with pytest.raises(SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    a, b = socket.socketpair(socket.AF_UNIX)  # local pipes (multiprocessing, joblib) still work
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    a.close()
    b.close()


def test_processes_the_suite_starts_refuse_internet_sockets():
    code = ("import socket\n"
            "try:\n    socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\nexcept RuntimeError as e:\n"
            "    print(type(e).__name__)\nelse:\n    print('open')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert r.stdout.strip() == "SocketBlockedError", r.stderr
