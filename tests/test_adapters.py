"""Conformance adapters: a bridge's modality picks how the suite builds, feeds and runs it."""
import pytest
import torch

from conformance import adapters
from conformance.adapters import ADAPTERS, TextCausalLM, adapter_for
from conformance.models import resolve


def test_registered_text_models_use_the_text_adapter():
    for model in ("Qwen/Qwen3-8B", "deepseek-ai/DeepSeek-V3", "mistralai/Mixtral-8x7B-v0.1"):
        assert isinstance(adapter_for(resolve(model).config), TextCausalLM)
    assert isinstance(adapter_for({"model_type": "nobody_knows"}), TextCausalLM)  # --mbridge-bridge


def test_a_modality_without_an_adapter_is_named(monkeypatch):
    class Audio:
        modality, model_type = "audio", "toy_audio"

    with pytest.raises(LookupError, match="no conformance adapter for modality 'audio' \\(of toy_audio\\)"):
        adapter_for(bridge=Audio())
    marker = object()
    monkeypatch.setitem(adapters.ADAPTERS, "audio", marker)
    assert adapter_for(bridge=Audio()) is marker


def test_a_vlm_gets_the_image_text_adapter():
    from conformance.adapters import ImageTextToText

    assert isinstance(adapter_for(resolve("google/gemma-3-4b-it").config), ImageTextToText)


def test_text_inputs_fold_into_the_vocabulary():
    base = torch.arange(0, 1000).reshape(4, 250)
    ids = ADAPTERS["text"].inputs({"vocab_size": 313}, base)
    assert ids.max() < 313 and torch.equal(ids, base % 313)
