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


def test_a_part_out_of_time_is_reported_and_the_rest_still_run(tmp_path):
  run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                        "--platform", "cpu", "--quick", "--out", str(tmp_path),
                        "--parts", "env,map_speed,input", "--budget_s", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  with open(tmp_path / "gpu_check.json") as f:
    res = json.load(f)
  assert tuple(res["parts"]) == ("env", "map_speed", "input")
  assert res["parts"]["map_speed"]["status"] == "timed out"
  assert res["parts"]["input"]["status"] != "ok"
  assert res["total_s"] < 30


def test_the_large_batch_is_the_largest_that_fits():
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import gpu_check  # pylint: disable=g-import-not-at-top
  gib = 2**30
  info = {"argument_bytes": 2 * gib, "output_bytes": 2 * gib, "alias_bytes": 2 * gib,
          "temp_bytes": 4 * gib, "device_bytes_limit": 80 * gib}
  # 2 GiB of state, 0.25 GiB of activations per triplet: 256 needs 66 GiB, within 72.
  assert gpu_check._fit_batch(info, [256, 128, 64], 16) == 256
  assert gpu_check._fit_batch({**info, "temp_bytes": 8 * gib}, [256, 128, 64], 16) == 128
  assert gpu_check._fit_batch({**info, "temp_bytes": 64 * gib}, [256, 128, 64], 16) == 64
  assert gpu_check._fit_batch({**info, "device_bytes_limit": None}, [256, 128, 64], 16) == 256
  assert gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert gpu_check.bf16_peak("NVIDIA H200") == 989e12
  assert gpu_check.bf16_peak("cpu") is None
