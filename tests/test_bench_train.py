"""bench/train.py, the training benchmark harness: its --smoke mode end to end on CPU (tiny model, a few steps),
and the results section it writes into bench/README.md.

The official script takes part when bench/vendor/ holds it (`bench/train.py --vendor`; it is not committed). Without
it, the report must say that run was skipped, and why.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_ours_and_the_official_script(tmp_path):
    harness = load_harness()
    vendored = harness.official_script_path(harness.pinned_version("diffusers")).is_file()
    results = tmp_path / "results"
    # two of the three smoke configurations: within a minute on 2 busy cores
    cmd = [sys.executable, "bench/train.py", "--smoke", "--configs", "official-classic,ours-classic"]
    cmd += ["--results-dir", str(results), "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    [path] = results.glob("train-cpu-*-smoke.json")
    report = json.loads(path.read_text())
    assert report["smoke"] is True and report["device"]["cuda"] is False
    assert report["versions"]["torch"] and report["versions"]["diffusers"] == harness.pinned_version("diffusers")
    settings = report["settings"]
    # each program is asked for one step more than is timed, and ended when that step begins (no final save)
    timed, asked, warmup = settings["steps"], settings["program_steps"], settings["warmup"]
    assert asked == timed + 1 and settings["steps_measured"] == timed - warmup > 0
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["official-classic", "ours-classic"]

    ours = rows["ours-classic"]
    assert ours["status"] == "ok", ours.get("log_tail")
    assert ours["command"].startswith("dreambooth train --model ")
    assert "--with-prior-preservation" in ours["command"] and "--gradient-checkpointing" in ours["command"]
    assert f"--max-train-steps {asked}" in ours["command"]
    assert ours["unet_forward_calls"] == asked  # one UNet call per step: the timer saw every step and nothing else
    assert ours["steps_measured"] == timed - warmup and ours["returncode"] == 0
    assert 0 < ours["step_s_min"] <= ours["step_s_median"] <= ours["step_s_max"]
    assert ours["max_rss_gib"] > 0 and "peak_allocated_gib" not in ours  # no CUDA: no GPU figures are made up

    official = rows["official-classic"]
    if vendored:
        assert official["status"] == "ok", official.get("log_tail")
        assert "train_dreambooth.py --pretrained_model_name_or_path" in official["command"]
        assert "--with_prior_preservation" in official["command"] and "--gradient_checkpointing" in official["command"]
        assert official["unet_forward_calls"] == asked and official["steps_measured"] == timed - warmup
        assert len(report["official_script"]["sha256"]) == 64
        assert report["comparisons"]["ours-classic_vs_official-classic"] > 0
    else:
        assert official["status"] == "skipped" and "--vendor" in official["reason"]

    table = path.with_suffix(".md").read_text()
    assert "| ours-classic |" in table and "smoke run" in table


def test_smoke_run_measures_a_flux_lora_both_ways(tmp_path):
    """The Flux configurations: a tiny Flux diffusers folder built for both programs, ours with diffusers' own LoRA
    targets (so the same modules train), one transformer call per step in each."""
    harness = load_harness()
    vendored = harness.official_script_path(harness.pinned_version("diffusers"), "flux").is_file()
    results = tmp_path / "results"
    cmd = [sys.executable, "bench/train.py", "--smoke", "--configs", "official-flux-lora,ours-flux-lora"]
    cmd += ["--results-dir", str(results), "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = results.glob("train-cpu-*-smoke.json")
    report = json.loads(path.read_text())
    rows = {r["name"]: r for r in report["results"]}
    asked = report["settings"]["program_steps"]
    ours = rows["ours-flux-lora"]
    assert ours["status"] == "ok", ours.get("log_tail")
    assert ours["family"] == "flux" and "--adapter lora" in ours["command"]
    assert f"--lora-targets {harness.FLUX_DIFFUSERS_TARGETS}" in ours["command"]
    assert ours["unet_forward_calls"] == asked and ours["steps_measured"] > 0
    assert (tmp_path / "work" / "model-tiny-flux" / "transformer" / "config.json").is_file()
    official = rows["official-flux-lora"]
    if vendored:
        assert official["status"] == "ok", official.get("log_tail")
        assert "train_dreambooth_lora_flux.py --pretrained_model_name_or_path" in official["command"]
        assert official["unet_forward_calls"] == asked
        assert report["comparisons"]["ours-flux-lora_vs_official-flux-lora"] > 0
    else:
        assert official["status"] == "skipped" and "--vendor" in official["reason"]


def test_readme_results_section_is_replaced_and_smoke_runs_stay_out(tmp_path):
    harness = load_harness()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\nintro\n{harness.README_BEGIN}\nold table\n{harness.README_END}\nafter\n")
    row = {
        "name": "ours-classic", "contender": "ours", "what": "w", "mixed_precision": "fp16", "eight_bit_adam": True,
        "checkpointing": True, "batch_size": 1, "train_text_encoder": False, "levers": [], "memory_cap_gb": None,
        "status": "ok", "step_s_median": 0.05, "steps_per_s": 20.0, "peak_allocated_gib": 5.5,
    }  # fmt: skip
    report = {
        "smoke": False,
        "device": {"name": "GPU X", "driver": "1.0", "slug": "gpu-x"},
        "versions": {"torch": "t", "diffusers": "d", "transformers": "tr", "bitsandbytes": "b"},
        "settings": {"resolution": 512, "steps": 70, "warmup": 10},
        "results": [row],
    }
    harness.update_readme([report, {**report, "smoke": True, "device": {"name": "SMOKE CPU"}}], readme)
    text = readme.read_text()
    assert text.startswith("# Bench\nintro\n") and text.endswith(f"{harness.README_END}\nafter\n")
    assert "old table" not in text and "GPU X, driver 1.0" in text and "| ours-classic |" in text
    assert "SMOKE CPU" not in text


def test_every_gpu_configuration_is_a_command_dreambooth_train_accepts(tmp_path):
    """The GPU runs cannot be tried here: at least their command lines must parse and validate as ours do."""
    from enum import Enum

    import typer

    from dreambooth.cli import app
    from dreambooth.config import build_train_config

    harness = load_harness()
    for folder in ("model", "instance", "class"):
        (tmp_path / folder).mkdir()
    inputs = harness.Inputs(tmp_path / "model", tmp_path / "instance", tmp_path / "class", 512, 71)
    train = typer.main.get_command(app).commands["train"]
    ours = [c for c in harness.CONFIGS if c.contender == "ours"]
    assert {
        "--low-vram",
        "--fused-backward",
        "--paged-adam",
        "--torch-compile",
        "--channels-last",
        "--base-precision",
        "--blocks-to-swap",
        "--vram-budget",
    } <= {lever for c in ours for lever in c.levers}
    for cfg in ours:
        args = harness.ours_command(cfg, inputs, tmp_path / "out")
        assert args[:2] == ["dreambooth", "train"]
        with train.make_context("dreambooth train", args[2:]) as ctx:
            flags = {k: (v.value if isinstance(v, Enum) else v) for k, v in ctx.params.items() if k != "config"}
        settings = build_train_config(None, flags)
        # the SD recipe with prior preservation; Flux LoRAs without, as the anchors publish their figures
        assert settings.with_prior_preservation == (cfg.family != "flux")
        assert settings.adapter == ("lora" if cfg.family == "flux" or "lora" in cfg.levers else "full")
        assert settings.resolution == 512 and settings.max_train_steps == 71
        assert settings.train_batch_size == cfg.batch_size and settings.train_text_encoder == cfg.train_text_encoder
        if "--low-vram" in cfg.levers:  # the profile's choices, not the classic flags
            assert settings.fused_backward and settings.paged_adam and settings.mixed_precision == "fp16"
        else:
            assert settings.mixed_precision == cfg.mixed_precision and settings.use_8bit_adam == cfg.eight_bit_adam
        assert settings.fused_backward == any(lever in ("--fused-backward", "--low-vram") for lever in cfg.levers)


def test_packed_bitsandbytes_keeps_the_gpu_machines_kernels_only(tmp_path):
    """The 41 MiB wheel holds one library per CUDA/ROCm version; what travels keeps cu130's and the CPU one."""
    import zipfile

    bench = load_harness()
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cuda118", "cuda128", "cuda130", "cuda132", "rocm72", "cpu"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"\0" * 10)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "")
    bench.trim_bitsandbytes(wheel, "130")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if ".so" in n} == {
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cpu.so",
    }
    assert {"bitsandbytes/__init__.py", "bitsandbytes-0.50.2.dist-info/RECORD"} <= names
