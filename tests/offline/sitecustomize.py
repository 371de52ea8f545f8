"""Imported at start-up by every Python process the test suite starts (``tests/conftest.py`` puts this folder
first on ``PYTHONPATH`` and sets ``INFERNO_BLOCK_SOCKETS=1``): CLI runs, sweep jobs, worker processes refuse
every socket but Unix-domain ones, as the suite's own process does (pytest-socket), so a test that passes
proves the code path runs offline."""

import os

if os.environ.get("INFERNO_BLOCK_SOCKETS") == "1":
    from pytest_socket import disable_socket

    disable_socket(allow_unix_socket=True)
