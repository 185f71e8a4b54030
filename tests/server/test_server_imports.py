"""The HTTP side never imports torch: a worker starts fast and a crash on
one side never takes the other down."""

import subprocess
import sys


def test_server_modules_do_not_import_torch():
    code = ("import sys, pkgutil, importlib, server\n"
            "for m in pkgutil.walk_packages(server.__path__, 'server.'):\n"
            "    if m.name != 'server.asgi':  # builds the app from the supervisor's environment\n"
            "        importlib.import_module(m.name)\n"
            "import dfastllm.engine.client, dfastllm.tokenizer\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(len([n for n in sys.modules if n.startswith('server.')]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20
