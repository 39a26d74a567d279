import json

import pytest

from prunepath.cli.main import build_parser, main


@pytest.fixture
def tiny_dir(tiny_model, tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return path


def test_convert_and_info(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", "--model", str(tiny_dir), "--out", str(out), "--neurons-per-expert", "16"]) == 0
    assert "2 layers x 4 experts of 16 neurons" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts_per_layer"] == 4 and info["layers"] == 2 and info["architecture"] == "LlamaForCausalLM"
    assert info["routing"]["tau"] == 1.05
    assert main(["info", str(out)]) == 0
    assert "experts_per_layer" in capsys.readouterr().out


def test_convert_num_experts(tiny_dir, tmp_path, capsys):
    assert main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "c"), "--num-experts", "8"]) == 0
    assert "8 experts of 8 neurons" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["convert", "--model", "no-such-model-xyz", "--out", "OUT"], "not a built-in name"),
    (["convert", "--model", "TINY", "--out", "OUT", "--neurons-per-expert", "7"], "does not divide"),
    (["info", "TINY"], "not a PrunePath checkpoint"),
])
def test_errors_exit_2_with_message(argv, message, tiny_dir, tmp_path, capsys):
    argv = [a.replace("TINY", str(tiny_dir)).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_on_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"convert", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: prunepath " + name in capsys.readouterr().out
