"""`deltafleet demo` end to end on the cached llama pair (few distillation steps)."""

from deltafleet.cli import main


def test_demo_prints_fidelity_and_generations(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("base", "fine-tune", "BitDelta stage 1", "BitDelta distilled"):
        assert f"\n{row} " in out
    assert out.count("  base + delta  ") == 3 and out.count("  fine-tune     ") == 3
    assert (tmp_path / "delta.safetensors").is_file() and (tmp_path / "result.json").is_file()


def test_demo_refuses_bad_input_in_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub"), "--no-serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltafleet demo: error: --out ") and "cannot create the output folder" in err
    assert "Traceback" not in err
