import torch

import molmoe
from molmoe.cli import main
from tests.tiny import random_inputs, random_model, write_checkpoint


def test_convert_command(tmp_path, capsys):
    model = random_model("tiny-molmoe")
    write_checkpoint(model, tmp_path / "src", "molmoe-megablocks")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    inputs = random_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(molmoe.load(tmp_path / "dst")(*inputs), model(*inputs))


def test_convert_command_reports_bad_input(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert "no such local directory" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
