"""`deltafleet demo` end to end on the cached llama pair (few distillation steps)."""

from deltafleet.cli import main


def test_demo_prints_fidelity_and_generations(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("base", "fine-tune", "BitDelta stage 1", "BitDelta distilled"):
        assert f"\n{row} " in out
    assert out.count("  base + delta  ") == 3 and out.count("  fine-tune     ") == 3
    assert (tmp_path / "delta.safetensors").is_file() and (tmp_path / "result.json").is_file()
