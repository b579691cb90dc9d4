"""Every malformed config or index gives one clear error naming the field and value, on every path
(loader, converter, verify, estimate), before anything large is allocated."""

import json
import re
import shutil

import pytest

import mlx_dsv4
from mlx_dsv4.config import ConfigError, ModelArgs
from mlx_dsv4.convert.convert import convert
from mlx_dsv4.convert.errors import ConvertError
from mlx_dsv4.convert.estimate import estimate_config
from mlx_dsv4.convert.recipes import Recipe
from mlx_dsv4.convert.verify import verify_dir
from mlx_dsv4.tiny import tiny_config

NAN = float("nan")
# (change to the tiny flash config, field named in the error, value shown in the error)
BAD_CONFIGS = {
    "string in an integer field": ({"hidden_size": "64"}, "hidden_size", "'64'"),
    "NaN in an integer field": ({"num_attention_heads": NAN}, "num_attention_heads", "nan"),
    "null in an integer field": ({"moe_intermediate_size": None}, "moe_intermediate_size", "None"),
    "float in an integer field": ({"n_routed_experts": 8.5}, "n_routed_experts", "8.5"),
    "absurd expert count": ({"n_routed_experts": 10**8}, "n_routed_experts", "100000000"),
    "absurd float expert count": ({"n_routed_experts": 1e8}, "n_routed_experts", "100000000.0"),
    "absurd size overall": ({"hidden_size": 65536, "moe_intermediate_size": 262144, "n_routed_experts": 16384},
                            "parameters", "hidden_size"),
    "compress_ratios as a string": ({"compress_ratios": "0,0,4"}, "compress_ratios", "'0,0,4'"),
    "compress_ratios null": ({"compress_ratios": None}, "compress_ratios", "None"),
    "compress ratio as a string": ({"compress_ratios": [0, 0, "4", 128, 4, 128]}, "compress_ratios[2]", "'4'"),
    "layer_types as an int": ({"layer_types": 3, "compress_ratios": ...}, "layer_types", "3"),
    "compress_ratios a boolean beside layer_types": ({"layer_types": [], "compress_ratios": False},
                                                     "compress_ratios", "False"),
    "infinite float field": ({"rms_norm_eps": float("inf")}, "rms_norm_eps", "inf"),
    "boolean as a string": ({"norm_topk_prob": "yes"}, "norm_topk_prob", "'yes'"),
    "missing shape field": ({"hidden_size": ...}, "missing field", "hidden_size"),
    "unknown expert dtype": ({"expert_dtype": "fp2"}, "expert_dtype", "'fp2'"),
    "bad eos": ({"eos_token_id": "eos"}, "eos_token_id", "'eos'"),
}


def bad_config(change):
    cfg = tiny_config("flash", vocab_size=256)
    for k, v in change.items():
        if v is ...:
            del cfg[k]
        else:
            cfg[k] = v
    return cfg


def check_message(text, field, value):
    assert field in text and value in text, text


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_error_names_field_and_value(case):
    change, field, value = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_dict(bad_config(change))
    check_message(str(err.value), field, value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mlx_dsv4.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ok", preset="flash", vocab_size=256)


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(checkpoint, out, Recipe("none", dtype="float32"), progress=False, log=lambda s: None)
    return out


def with_config(src, tmp_path, cfg_text: bytes):
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    (path / "config.json").write_bytes(cfg_text)
    return path


@pytest.mark.parametrize("case", ["string in an integer field", "compress_ratios null", "layer_types as an int",
                                  "absurd expert count", "missing shape field"])
def test_every_path_reports_the_field(case, checkpoint, converted, tmp_path):
    change, field, value = BAD_CONFIGS[case]
    text = json.dumps(bad_config(change)).encode()
    src = with_config(checkpoint, tmp_path / "src", text)
    with pytest.raises(ConfigError) as err:
        mlx_dsv4.load_model(src)
    check_message(str(err.value), field, value)
    assert "config.json" in str(err.value)

    out = tmp_path / "out"
    with pytest.raises(ConvertError) as err:
        convert(src, out, Recipe("native"), progress=False, log=lambda s: None)
    check_message(str(err.value), field, value)
    assert not out.exists()

    with pytest.raises(ConvertError) as err:
        estimate_config(bad_config(change), Recipe("q4"), 4096)
    check_message(str(err.value), field, value)

    out_cfg = json.loads((converted / "config.json").read_text())
    for k, v in change.items():
        if v is ...:
            out_cfg.pop(k, None)
        else:
            out_cfg[k] = v
    broken = with_config(converted, tmp_path / "conv", json.dumps(out_cfg).encode())
    problems, _ = verify_dir(broken)
    assert problems
    check_message(problems[-1], field, value)


@pytest.mark.parametrize("text, expect", [
    (b"[1, 2, 3]", "must be a JSON object, got list"),
    (b'{"hidden_size": "\xff\xfe"}', "not UTF-8 text (byte offset 17)"),
    (b"{not json", "invalid JSON"),
])
def test_unreadable_config_files(text, expect, checkpoint, tmp_path):
    src = with_config(checkpoint, tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(expect)):
        mlx_dsv4.load_model(src)
    with pytest.raises(ConvertError, match=re.escape(expect)):
        convert(src, tmp_path / "out", Recipe("native"), progress=False, log=lambda s: None)
    problems, _ = verify_dir(src)
    assert expect in problems[0]


@pytest.mark.parametrize("weight_map, expect", [
    (["model.safetensors"], "weight_map"),
    ({"embed.weight": 3}, "weight_map"),
    ({"embed.weight": "../other/model.safetensors"}, "weight_map"),
])
def test_bad_index(weight_map, expect, checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(mlx_dsv4.CheckpointError, match=expect):
        mlx_dsv4.load_model(src)
    with pytest.raises(ConvertError, match=expect):
        convert(src, tmp_path / "out", Recipe("native"), progress=False, log=lambda s: None)


@pytest.mark.parametrize("flag, value", [("--shard-size", "nan"), ("--shard-size", "-1"), ("--max-size", "inf"),
                                         ("--context", "0"), ("--context", "many")])
def test_convert_flags_refuse_non_finite_and_non_positive(flag, value, capsys):
    from mlx_dsv4.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--estimate-only", "--preset", "flash", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err


@pytest.mark.parametrize("text, expect", [(b"not json at all", "invalid JSON"), (b"[1]", "got list"),
                                          (b'{"hidden_size": null}', "missing field")])
def test_estimate_from_a_bad_config_file(text, expect, tmp_path, capsys):
    from mlx_dsv4.cli import main

    path = tmp_path / "settings.txt"
    path.write_bytes(text)
    assert main(["convert", "--estimate-only", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and expect in err


@pytest.mark.parametrize("command", ["generate", "verify"])
def test_commands_report_a_bad_config_by_field(command, checkpoint, converted, tmp_path, capsys):
    from mlx_dsv4.cli import main

    change, field, value = BAD_CONFIGS["NaN in an integer field"]
    if command == "generate":
        src = with_config(checkpoint, tmp_path, json.dumps(bad_config(change)).encode())
        rc = main(["generate", "--model", str(src), "--prompt", "hi", "--max-tokens", "1"])
    else:
        cfg = json.loads((converted / "config.json").read_text()) | change
        src = with_config(converted, tmp_path, json.dumps(cfg).encode())
        rc = main(["convert", "--verify", str(src)])
    assert rc == 1
    err = capsys.readouterr().err
    check_message(err, field, value)
    assert "Traceback" not in err
