"""Imported once by the runner's forkserver, so every rank starts with these modules loaded."""
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
