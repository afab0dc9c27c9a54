"""Greedy decoding that verifies a draft (HF's continuation) in one forward gives the tokens
step-by-step decoding gives, whether the draft is right, wrong from some token on, or short."""
import pytest
import torch


@pytest.mark.parametrize("layout", ["tp1pp1", "pp2"])
def test_draft_gives_step_by_step_tokens(conformance, toy, layout):
    ids = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    out = conformance.pool.run("tests.draft_tasks:decode", toy_dir=str(toy), layout=layout, ids=ids,
                               steps=10)[0]
    plain = out.pop("plain")
    assert plain.shape == (3, 22)
    for name, got in out.items():
        assert torch.equal(got, plain), name


def test_a_layout_met_again_reuses_its_process_groups(conformance):
    """The rank pool switches layouts per case; each process group is made once (new gloo groups
    for every case were most of the suite's time) and still works when met again."""
    assert conformance.pool.run("tests.draft_tasks:groups_kept") == [[True, True]] * 4
