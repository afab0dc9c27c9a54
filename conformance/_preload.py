"""Imported once by the runner's forkserver, so every rank starts with these modules loaded."""
import atexit
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
import megatron.core  # noqa: E402,F401
from megatron.core.models.gpt import GPTModel  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402,F401

import bridges  # noqa: E402,F401
from bridges.core import registry  # noqa: E402

registry.load_families()

# What was imported lives as long as the ranks: out of the collector's way (a full collection
# would otherwise walk millions of these objects again and again while the ranks build models)
import gc  # noqa: E402

gc.freeze()


def _in_forkserver() -> bool:
    from multiprocessing import forkserver

    f = sys._getframe()
    while f is not None:
        if f.f_code is forkserver.main.__code__:
            return True
        f = f.f_back
    return False


def _exit_now(pid: int = os.getpid()) -> None:
    """The forkserver exits as soon as its owner is gone (EOF on its "alive" pipe), not after
    seconds of tearing down torch, transformers and megatron while holding ~750 MB; the ranks'
    last-resort PR_SET_PDEATHSIG (see conformance.runner) fires then. It has nothing to clean
    up. Registered last, so it runs first; only in the forkserver itself (its forked ranks leave
    through os._exit and never run it)."""
    if os.getpid() == pid:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(0)


if _in_forkserver():
    atexit.register(_exit_now)
