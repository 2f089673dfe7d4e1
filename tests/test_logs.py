"""cnnkit.logs: the command line's stderr stays one line when a data-loading worker dies mid-handshake."""

from __future__ import annotations

import sys
import threading

import pytest

from cnnkit.logs import quiet_dead_worker_handshakes

# A function whose frames say they are multiprocessing's resource sharer: its listener loop
# catches the EOFError of a handshake cut off by a killed worker and passes it to sys.excepthook.
_SHARER = compile("import sys\ndef serve():\n    try:\n        raise EOFError\n    except EOFError:\n"
                  "        sys.excepthook(*sys.exc_info())\ndef crash():\n    raise EOFError\n",
                  "/usr/lib/python3/multiprocessing/resource_sharer.py", "exec")


def _run_in_thread(target) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


@pytest.fixture
def hook(monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    quiet_dead_worker_handshakes()
    quiet_dead_worker_handshakes()  # idempotent: one hook, not two
    return threading.excepthook


def test_the_resource_sharers_eof_is_not_printed_but_other_thread_errors_are(hook, capsys):
    namespace: dict = {}
    exec(_SHARER, namespace)
    _run_in_thread(namespace["serve"])  # the listener's own sys.excepthook call
    _run_in_thread(namespace["crash"])  # an uncaught error of that thread
    assert capsys.readouterr().err == ""

    def elsewhere() -> None:
        raise EOFError("not the resource sharer")

    _run_in_thread(elsewhere)
    err = capsys.readouterr().err
    assert "Traceback" in err and "not the resource sharer" in err
