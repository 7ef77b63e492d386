"""v-prediction is decided by evidence, in a fixed order, and never guessed silently."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import LAYOUTS, write_original
from tests.original_layouts import original_state_dict

V_YAML = 'model:\n  params:\n    parameterization: "v"\n'
EPS_YAML = "model:\n  params:\n    linear_start: 0.00085\n"


def inspect(cli, *args):
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def probe_file(path, out_bias: float, family: str = "sd2"):
    """A tiny UNet whose output is a constant: the probe's score is then out_bias - 0.5."""
    state = original_state_dict(LAYOUTS[family])
    state["model.diffusion_model.out.2.weight"].zero_()
    state["model.diffusion_model.out.2.bias"].fill_(out_bias)
    save_file(state, path)
    return path


def test_metadata_decides(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd2", metadata={"modelspec.prediction_type": "v"})
    report = inspect(cli, src)
    assert report["model_type"] == "sd2-v"
    assert any("metadata" in e for e in report["evidence"])


def test_sidecar_yaml_decides(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd2")
    (tmp_path / "m.yaml").write_text(V_YAML)
    report = inspect(cli, src)
    assert report["model_type"] == "sd2-v" and any("sidecar" in e for e in report["evidence"])


def test_order_flag_then_original_config_then_metadata_then_sidecar(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd2", metadata={"modelspec.prediction_type": "epsilon"})
    (tmp_path / "m.yaml").write_text(V_YAML)  # sidecar says v, but metadata comes first
    assert inspect(cli, src)["model_type"] == "sd2"
    (tmp_path / "given.yaml").write_text(V_YAML)
    assert inspect(cli, src, "--original-config", tmp_path / "given.yaml")["model_type"] == "sd2-v"
    (tmp_path / "eps.yaml").write_text(EPS_YAML)
    assert inspect(cli, src, "--original-config", tmp_path / "eps.yaml", "--model-type", "sd2-v")["model_type"] == (
        "sd2-v"
    )


@pytest.mark.parametrize(("bias", "model_type"), [(-2.0, "sd2-v"), (0.5, "sd2")])
def test_probe_decides_when_nothing_else_does(tmp_path, cli, bias, model_type):
    report = inspect(cli, probe_file(tmp_path / "p.safetensors", bias))
    assert report["model_type"] == model_type and report["prediction_type_from"] == "probe"
    assert any("probe" in e for e in report["evidence"])


def test_inconclusive_probe_names_the_flag(tmp_path, cli):
    src = probe_file(tmp_path / "p.safetensors", -0.25)  # score -0.75: inside the dead band
    result = cli("convert", src, tmp_path / "d")
    assert result.exit_code == 2
    assert "cannot tell" in result.stderr and "--model-type" in result.stderr
    assert not (tmp_path / "d").exists()


def test_converted_scheduler_carries_the_prediction_type(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd2")
    assert cli("convert", src, tmp_path / "d", "--model-type", "sd2-v").exit_code == 0
    scheduler = json.loads((tmp_path / "d" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    unet = json.loads((tmp_path / "d" / "unet" / "config.json").read_text())
    assert unet["sample_size"] == 96  # 768 px


def test_fp16_probe_runs_on_cpu(tmp_path, cli):
    state = {k: v.half() if v.is_floating_point() else v for k, v in original_state_dict(LAYOUTS["sd2"]).items()}
    state["model.diffusion_model.out.2.weight"].zero_()
    state["model.diffusion_model.out.2.bias"].fill_(-2.0)
    save_file(state, tmp_path / "h.safetensors")
    assert inspect(cli, tmp_path / "h.safetensors")["model_type"] == "sd2-v"
    assert torch.float16 == state["model.diffusion_model.out.2.bias"].dtype


# ── SD 1.x: epsilon unless something says v; the probe is never asked ──


def test_sd1_is_epsilon_even_where_the_probe_would_say_v(tmp_path, cli):
    report = inspect(cli, probe_file(tmp_path / "p.safetensors", -2.0, family="sd1"))  # the probe would say v
    assert report["model_type"] == "sd1" and report["prediction_type"] == "epsilon"
    assert report["prediction_type_from"] == "sd1-default"
    assert not any("probe" in e for e in report["evidence"])
    # inside the probe's dead band, an SD 2.x file is refused; an SD 1.x one converts
    inconclusive = probe_file(tmp_path / "q.safetensors", -0.25, family="sd1")
    assert cli("convert", inconclusive, tmp_path / "d").exit_code == 0


@pytest.mark.parametrize(
    ("how", "rule"), [("flag", "flag"), ("metadata", "metadata"), ("sidecar", "sidecar"), ("config", "original-config")]
)
def test_sd1_v_from_flag_metadata_sidecar_or_config(tmp_path, cli, how, rule):
    metadata = {"modelspec.prediction_type": "v"} if how == "metadata" else None
    src = write_original(tmp_path / "m.safetensors", "sd1", metadata=metadata)
    args = {"flag": ["--model-type", "sd1-v"], "config": ["--original-config", tmp_path / "given.yaml"]}.get(how, [])
    (tmp_path / ("m.yaml" if how == "sidecar" else "given.yaml")).write_text(V_YAML)
    report = inspect(cli, src, *args)
    assert (report["model_type"], report["prediction_type"], report["prediction_type_from"]) == (
        "sd1-v",
        "v_prediction",
        rule,
    )


def test_sd1_v_converts_to_a_v_scheduler_and_exports_with_its_yaml(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd1")
    assert cli("convert", src, tmp_path / "d", "--model-type", "sd1-v").exit_code == 0
    scheduler = json.loads((tmp_path / "d" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["_class_name"] == "PNDMScheduler"
    assert json.loads((tmp_path / "d" / "unet" / "config.json").read_text())["sample_size"] == 64  # 512 px

    result = cli("export", tmp_path / "d", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.stderr
    sidecar = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert sidecar["model"]["params"]["parameterization"] == "v"
    assert sidecar["model"]["params"]["cond_stage_config"]["target"].endswith("FrozenCLIPEmbedder")  # SD 1.x's
    assert sidecar["model"]["params"]["unet_config"]["params"]["context_dim"] == 768
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
    (tmp_path / "out.yaml").unlink()  # the metadata alone brings it back as sd1-v
    report = inspect(cli, tmp_path / "out.safetensors")
    assert report["model_type"] == "sd1-v" and report["prediction_type_from"] == "metadata"


def test_epsilon_sd1_export_writes_no_yaml(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd1")
    assert cli("convert", src, tmp_path / "d").exit_code == 0
    assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
    assert not (tmp_path / "out.yaml").exists()


def test_a_sidecar_that_is_not_utf8_is_one_line(tmp_path, cli):
    src = write_original(tmp_path / "m.safetensors", "sd1")
    (tmp_path / "m.yaml").write_bytes(b"model:\n  params: \xff\xfe\n")
    result = cli("inspect", src)
    assert result.exit_code == 2 and "m.yaml" in result.stderr and "Traceback" not in result.stderr
