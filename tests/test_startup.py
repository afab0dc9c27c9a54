"""Start-up cost: the CLI's help and `import bridges` import neither torch nor megatron-core."""
import subprocess
import sys

PROBE = """
import contextlib, io, sys
import bridges
from bridges.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--help"], ["convert", "--help"], ["convert", "import", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
print(sorted(m for m in ("torch", "megatron", "transformers") if m in sys.modules))
"""


def test_help_imports_nothing_heavy():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
