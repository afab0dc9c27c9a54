"""`mbridge` for the example scripts under test: sends its arguments to the test session's warm
rank pool (tests/test_examples.py serves them on $MBRIDGE_POOL_SOCKET) and prints what rank 0
printed, exiting with the ranks' status. The same CLI code runs; only the process start and
imports are saved. Standard library only, so it starts fast."""
import json
import os
import socket
import sys

with socket.socket(socket.AF_UNIX) as s:
    s.connect(os.environ["MBRIDGE_POOL_SOCKET"])
    s.sendall(json.dumps({"argv": sys.argv[1:]}).encode() + b"\n")
    reply = json.loads(s.makefile().readline())
sys.stdout.write(reply["out"])
sys.stderr.write(reply["err"])
sys.exit(reply["rc"])
