"""Tasks for test_convert.py, run on every rank of the pool."""


def cli(argv: list[str]) -> int:
    from bridges.cli import main

    return main(argv)


def cli_captured(argv: list[str]) -> tuple[int, str]:
    """``mbridge <argv>`` on this rank: its exit status and what it printed to stderr."""
    import contextlib
    import io

    from bridges.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def cli_stdout(argv: list[str]) -> tuple[int, str]:
    """``mbridge <argv>`` on this rank: its exit status and what it printed to stdout."""
    import contextlib
    import io

    from bridges.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def assert_same_checkpoint(src, back) -> None:
    """Every stored tensor of HF checkpoint ``back`` equals ``src``'s bit for bit (float8 codes
    compared as bytes), and nothing more or less is stored. Run in the test process."""
    from bridges.core.hf_io import differences

    assert differences(src, back) == []

def cli_output(argv: list[str]) -> tuple[int, str, str]:
    """``mbridge <argv>`` on this rank: its exit status, stdout and stderr."""
    import contextlib
    import io

    from bridges.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def quantized_roundtrip(pool, src: str, tmp, import_args: list[str]):
    """``mbridge convert import`` of quantized toy ``src`` at ``import_args``, then ``convert export``
    at PP2 with ``--keep-quantization`` (every tensor back bit-exactly, asserted) and without it;
    returns the values export as an HFCheckpoint. Run in the test process."""
    from bridges.core.hf_io import HFCheckpoint

    mc = tmp / "m"
    run = lambda argv: pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    assert run(["convert", "import", "--hf", src, "--out", str(mc), *import_args]) == [0] * pool.world
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp / "q"), "--pp", "2",
                "--keep-quantization"]) == [0] * pool.world
    assert_same_checkpoint(HFCheckpoint(src), HFCheckpoint(tmp / "q"))
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp / "v")]) == [0] * pool.world
    return HFCheckpoint(tmp / "v")


def assert_quant_passes(conformance, model_spec, kind: str, layouts) -> None:
    """The quant and logits items of quantized toy ``kind`` pass at every layout (test process)."""
    for layout in layouts:
        res = conformance.quant_case(model_spec, kind, layout=layout)
        assert res["quant"].passed and res["logits"].passed, (layout, res["quant"].details, str(res["logits"]))


def assert_quant_bug_caught(conformance, model_spec, kind: str, mutant: str) -> None:
    """Mutant ``tests.mutants:<mutant>`` fails the quant item (imported values differ) and the logits."""
    res = conformance.quant_case(model_spec, kind, bridge_ref=f"tests.mutants:{mutant}")
    assert not res["quant"].passed and "imported values differ" in res["quant"].details, res["quant"].details
    assert not res["logits"].passed
