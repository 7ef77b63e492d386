"""bench/lora.py, full fine-tune vs LoRA: its --smoke mode end to end on CPU (tiny model, a few steps)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_measures_lora_and_full(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "bench/lora.py", "--smoke", "--results-dir", str(results), "--work-dir", str(tmp_path / "w")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    [path] = results.glob("lora-cpu-*core-smoke.json")
    report = json.loads(path.read_text())
    assert report["smoke"] is True
    assert report["machine"]["nproc"] > 0 and report["machine"]["ram_gib"] > 0
    versions = report["versions"]
    assert versions["torch"] and versions["diffusers"] and versions["peft"]
    assert "dreambooth_commit" in versions
    settings = report["settings"]
    assert settings["steps"] == 4 and settings["warmup"] == 2 and settings["prior_preservation"] is False
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["lora-r4", "full"]
    for row in rows.values():
        assert row["status"] == "ok", row.get("log_tail")
        assert row["command"].startswith("dreambooth --log-format json train --model ")
        assert "--export-single-file" in row["command"] and "--max-train-steps 4" in row["command"]
        assert len(row["step_s"]) == 4 and row["steps_measured"] == 2 and row["step_s_median"] > 0
        assert row["peak_rss_bytes"] > 0
        assert row["checkpoint_bytes"] > 0 and row["export_bytes"] > 0
        assert row["checkpoint"] == "checkpoints/step-4"
    assert "--adapter lora" in rows["lora-r4"]["command"] and "--adapter full" in rows["full"]["command"]
    assert any(f.startswith("lora/") for f in rows["lora-r4"]["checkpoint_files"])
    assert any("-lora-step-4" in f for f in rows["lora-r4"]["export_files"])
    # the LoRA files are a small part of a full checkpoint, even on the tiny model
    assert rows["lora-r4"]["checkpoint_bytes"] < rows["full"]["checkpoint_bytes"]
    assert rows["lora-r4"]["export_bytes"] < rows["full"]["export_bytes"]

    table = path.with_suffix(".md").read_text()
    assert "| lora-r4 |" in table and "| full |" in table and "Smoke run" in table
