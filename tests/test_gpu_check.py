"""bench/gpu_check.py end to end on the CPU at tiny sizes, so that the GPU check cannot rot."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("env", "data", "correctness", "train_step", "embedding", "map_speed", "input", "tests")


def test_quick_check_reports_every_part(tmp_path):
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                        "--platform", "cpu", "--quick", "--out", str(out), "--budget_s", "900"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  with open(out / "gpu_check.json") as f:
    res = json.load(f)
  assert (out / "gpu_check.log").stat().st_size > 0
  assert tuple(res["parts"]) == PARTS
  for name, part in res["parts"].items():
    assert part["status"] == "ok", (name, part)
  assert res["parts"]["env"]["backend"] == "cpu"
  corr = res["parts"]["correctness"]
  for key in ("cpu_float32", "device_float32", "device_bfloat16"):
    assert set(corr["map"][key]) == {"global", "joint", "joint_global_branch"}
    assert all(0 < v <= 100 for v in corr["map"][key].values())
  # Two CPU processes on the same checkpoint: float32 MAP agrees to the digit.
  assert all(d == 0 for d in corr["map_difference"]["float32"].values())
  assert set(corr["map_difference"]["bfloat16"]) == {"global", "joint", "joint_global_branch"}
  assert isinstance(corr["pass"], bool)
  steps = res["parts"]["train_step"]
  paths = {(r["path"], r["batch"]) for r in steps["table"]}
  # --quick stops the plan before float32 and PyTorch float32 at the large batch.
  assert paths == {("jax_bfloat16", 4), ("torch", 4), ("torch_bf16", 4), ("jax_bfloat16", 8),
                   ("torch_bf16", 8)}
  assert all(r["triplets_per_s"] > 0 for r in steps["table"])
  assert {r["flops"] > 0 for r in steps["runs"] if r["path"] == "xla"} == {True}
  assert set(steps["verdicts"]) == {"global_bf16_b4_vs_torch_fp32",
                                    "global_bf16_b8_vs_torch_autocast"}
  emb = res["parts"]["embedding"]
  assert emb["forward"]["embed_global"]["images_per_s"] > 0 and emb["split"]["images_per_s"] > 0
  assert res["parts"]["map_speed"]["steady_s"] > 0
  assert res["parts"]["map_speed"]["max_ap_diff_exact_scores"] < 1e-6
  inp = res["parts"]["input"]
  assert [r["workers"] for r in inp["rates"]] == [0, 1]
  assert inp["fed"]["pipeline_triplets_per_s"] > 0 and isinstance(inp["fed"]["holds"], bool)
  assert "passed" in res["parts"]["tests"]["summary"]
