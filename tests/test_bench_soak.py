"""bench/soak.py: its --smoke mode end to end on the CPU (tiny model, 30 steps, a save every 10)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_soak_samples_the_training_process_and_states_its_verdict(tmp_path):
    result = tmp_path / "soak.json"
    cmd = [sys.executable, "bench/soak.py", "--smoke", "--work-dir", str(tmp_path / "w"), "--result", str(result)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(result.read_text())
    assert report["exit_code"] == 0, report.get("stderr_tail")
    assert report["smoke"] is True and report["steps_reached"] == 30 and report["checkpoints_saved"] == 3
    assert report["checkpoints_left"] == ["step-10", "step-20", "step-30"]  # --keep-last 3
    assert report["machine"]["nproc"] > 0 and report["versions"]["torch"] and report["versions"]["diffusers"]
    assert "--max-train-steps 30" in report["command"] and "--keep-last 3" in report["command"]
    assert "--save-sample-prompt" in report["command"]
    samples = report["samples"]
    assert len(samples) >= 10 and all(s["rss"] > 50 * 2**20 and s["fds"] >= 3 for s in samples[5:])
    assert max(s["saves"] for s in samples) >= 2  # sampled across saves, not only before the first
    verdict = report["verdict"]
    assert "5%" in verdict["bound"] and "rss_growth" in verdict and "fds_max" in verdict
    # the exit status says whether the bound held
    assert done.returncode == (0 if verdict["ok"] else 1), done.stdout + done.stderr[-2000:]
