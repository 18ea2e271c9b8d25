"""train_grpo.py end to end on the tiny model (CPU): steps change the weights, multi-process, kill and resume,
non-finite stops, broken checkpoints. Each run is a subprocess, as a user would launch it (tests/tiny_runs.py)."""
import json
import os
import random
import re
import signal
import struct
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_grpo as tg
import vlm
from tiny_runs import ROOT, metrics, train


@pytest.fixture(scope="module")
def three_step_run(data_dir, cold_start_dir, tmp_path_factory):
    """A finished 3-step run on syn_count alone, shared by the tests that only read it or are refused by it."""
    out = tmp_path_factory.mktemp("three_steps") / "run"
    train(data_dir, out, cold_start_dir, "--max_steps=3", '--mixture={"syn_count": 1}')
    return out


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_three_steps_write_metrics_samples_and_change_weights(three_step_run, cold_start_dir):
    out = three_step_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ["loss", "kl", "clip_fraction", "reward", "reward/syn_count", "reward_fn/format", "reward_fn/math",
                "completion_length", "clipped_fraction", "lr", "grad_norm"]:
        assert all(key in r for r in rows), key
    assert any(r["grad_norm"] > 0 for r in rows)  # some group had a reward spread
    with open(out / "metrics.jsonl") as f:
        timing = json.loads(f.readline())
    assert timing["t_generate"] > 0 and timing["samples_per_s"] > 0 and timing["tokens_per_s"] > 0
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 3 and all(len(s["completions"]) == 6 for s in samples)
    # the final checkpoint loads with plain transformers and differs from the starting weights
    assert vlm.checkpoint_problem(str(out / "ckpt-000003")) is None
    start = load_file(cold_start_dir / "model.safetensors")
    end = load_file(out / "ckpt-000003" / "model.safetensors")
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert changed and all("visual" not in k for k in changed)  # the vision tower is frozen
    config = json.loads((out / "config.json").read_text())
    assert config["mixture_weights"] == {"syn_count": 1.0} and config["planned_steps"] == 3


def test_grpo_raises_the_accuracy_reward_not_only_the_format(data_dir, cold_start_dir, tmp_path):
    """RL teaches more than the layout. The cold start leaves the count to RL (tiny_runs.cold_start: its answers are
    random 0-6 after a rationale that counts the circles), so 50 steps on counting raise the math reward, and not
    only through more answers passing the format gate: the answers move to the counts the pictures hold (1-3).
    Measured, last 12 steps against the first 12, over 2 cold-start seeds x 3 GRPO seeds: math reward +0.056 to
    +0.125, its rate among formatted answers +0.025 to +0.097 (format 0.78-0.87 -> 0.91-0.95). The margins are about
    half the smallest gain."""
    out = tmp_path / "run"
    train(data_dir, out, cold_start_dir, "--max_steps=50", "--prompts_per_step=4", '--mixture={"syn_count": 1}',
          "--checkpoint_every=50", "--log_samples_every=0")
    rows = metrics(out)
    first, last = rows[:12], rows[-12:]

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    assert mean(last, "reward_fn/math") - mean(first, "reward_fn/math") >= 0.03
    formatted_accuracy = [mean(part, "reward_fn/math") / mean(part, "reward_fn/format") for part in (first, last)]
    assert formatted_accuracy[1] - formatted_accuracy[0] >= 0.012


def test_without_max_steps_one_pass_over_the_interleaved_pool(data_dir, cold_start_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(data_dir, out, cold_start_dir, "--max_steps=0", "--checkpoint_every=1000", "--beta=0",
                 "--log_samples_every=0", "--max_completion_length=8")
    expected = tg.build_schedule({"syn_colorcount": 0.5, "syn_count": 0.5}, {"syn_colorcount": 12, "syn_count": 60},
                                 2, 0, "interleave_under", seed=0)
    assert 5 <= len(expected) < 30  # the pool ends with the small domain's 12th row: about 24 rows, 12 steps
    assert len(metrics(out)) == len(expected)
    assert os.listdir(out / f"ckpt-{len(expected):06d}")
    assert f"done: {len(expected)} steps" in proc.stdout + proc.stderr


def test_two_processes_with_torchrun(data_dir, cold_start_dir, tmp_path):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    train(data_dir, out, cold_start_dir, "--max_steps=2", "--micro_batch_size=3", launcher=torchrun)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert vlm.checkpoint_problem(str(out / "ckpt-000002")) is None
    rng_files = sorted(os.listdir(out / "ckpt-000002" / "trainer"))
    assert "random_states_0.pkl" in rng_files and "random_states_1.pkl" in rng_files
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 2


def test_fsdp_launch_on_cpu_is_a_clear_error(data_dir, tmp_path):
    # accelerate 1.15 shards with FSDP only on accelerators; on CPU the shipped config would fail inside its plugin
    # ("no available devices") or, without fsdp_sync_module_states, train unsharded as DDP while claiming FSDP
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  os.path.join(ROOT, "config", "accelerate_fsdp.yaml"), "--num_processes=2", "--main_process_port=29541"]
    proc = train(data_dir, tmp_path / "run", "tiny", "--max_steps=1", launcher=accelerate, check=False)
    assert proc.returncode != 0
    assert "error: accelerate's FSDP needs GPUs" in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_to_the_same_metrics(data_dir, cold_start_dir, tmp_path):
    args = ("--max_steps=6", "--checkpoint_every=2")
    reference = tmp_path / "reference"
    uninterrupted = train(data_dir, reference, cold_start_dir, *args, wait=False)  # on the other core meanwhile
    killed = tmp_path / "killed"
    proc = train(data_dir, killed, cold_start_dir, *args, wait=False)
    deadline = time.time() + 300
    while not (killed / "ckpt-000002" / "checksums.json").exists():  # at least one checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))  # then SIGKILL at a random moment, possibly mid-write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train(data_dir, killed, cold_start_dir, *args, "--resume")
    output, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, output[-3000:]
    assert metrics(killed) == metrics(reference)  # bit-exact on CPU: same data, RNG and optimizer state
    a = load_file(reference / "ckpt-000006" / "model.safetensors")
    b = load_file(killed / "ckpt-000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_is_reported_and_skipped(data_dir, cold_start_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, cold_start_dir, "--max_steps=4", "--beta=0", "--log_samples_every=0")
    weights = out / "ckpt-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = train(data_dir, out, cold_start_dir, "--max_steps=4", "--beta=0", "--log_samples_every=0", "--resume")
    text = proc.stdout + proc.stderr
    assert "skipping checkpoint" in text and "corrupt file model.safetensors" in text
    assert "resumed from" in text and "ckpt-000002 at step 2" in text
    assert vlm.checkpoint_problem(str(out / "ckpt-000004")) is None  # rewritten by the resumed run


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, cold_start_dir, tmp_path):
    out = tmp_path / "run"
    # an absurd learning rate overflows the weights after the first update
    proc = train(data_dir, out, cold_start_dir, "--max_steps=6", "--checkpoint_every=1", "--learning_rate=1e30",
                 "--warmup_ratio=0", "--grad_clip=1e30", check=False)
    assert proc.returncode == 1
    assert re.search(r"training stopped: .*(non-finite|nan|inf)", proc.stderr), proc.stderr[-2000:]
    checkpoints = tg.find_checkpoints(str(out))
    assert checkpoints and all(vlm.checkpoint_problem(folder) is None for _, folder in checkpoints)
    assert len(metrics(out)) == checkpoints[0][0]  # nothing logged past the last good step


def test_a_failed_checkpoint_write_is_a_message_about_space(data_dir, cold_start_dir, tmp_path):
    # A real failed write: no file may grow past 1 MiB (RLIMIT_FSIZE, with SIGXFSZ ignored write() fails as on a
    # full disk); the checkpoint's optimizer state and weights are larger, the logs smaller.
    out = tmp_path / "run"
    limited = ("bash", "-c", "ulimit -f 1024; trap '' XFSZ; exec \"$@\"", "bash", sys.executable)
    proc = train(data_dir, out, cold_start_dir, "--max_steps=2", "--beta=0", "--log_samples_every=0",
                 launcher=limited, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"training stopped: writing checkpoint \S*ckpt-000002 failed \(.+\); the disk holding it has "
                     r"\d+ MiB free and a checkpoint takes about \d+ MiB: free some space", proc.stderr), proc.stderr
    assert "rerun with --resume" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]  # the partial folder is gone
    assert len(metrics(out)) == 2


def test_resume_refuses_another_mixture_and_loses_nothing(three_step_run, data_dir, cold_start_dir):
    out = three_step_run
    before = files_of(out)
    proc = train(data_dir, out, cold_start_dir, "--max_steps=3", "--mixture=uniform", "--resume", check=False)
    assert proc.returncode != 0 and "another mixture or schedule" in proc.stderr
    proc = train(data_dir, out, cold_start_dir, "--max_steps=3", '--mixture={"syn_count": 1}', check=False)
    assert proc.returncode != 0 and "pass --resume" in proc.stderr
    assert files_of(out) == before  # both refusals leave the finished run as it was


def wandb_history(run_file):
    """The logged rows of an offline W&B run: its .wandb file is a LevelDB-style log (32 KiB blocks of records
    with a 7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data, pos, chunk, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_log_gets_every_metrics_line_offline(data_dir, cold_start_dir, tmp_path):
    out = tmp_path / "run"
    train(data_dir, out, cold_start_dir, "--max_steps=2", "--beta=0", "--log_samples_every=0", "--wandb_log",
          "--wandb_run_name=tiny", env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = wandb_history(run_file)
    with open(out / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert len(logged) == len(lines) == 2
    for row, line in zip(logged, lines):
        assert row["_step"] == line["step"]
        assert {k: row[k] for k in line} == line  # every field, timings too, as metrics.jsonl has it


def test_an_out_dir_that_is_a_file_stops_the_run_before_anything_loads(data_dir, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    proc = train(data_dir, tmp_path / "run", tmp_path / "no_such_model", "--max_steps=1", check=False)
    # the out_dir error comes first: neither the data nor the (missing) start model was looked at
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr and "init_from" not in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback
