"""cold_start.py and train_grpo.py runs for the tests: a small dataset in prepare_data.py's record format, one
shared cold start, and each run launched as a subprocess, as a user would; and the vLLM server the tests share
(fixtures in conftest.py)."""
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request

import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage, ImageDraw

import vllm_cpu_server
import vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ("t_", "samples_per_s", "tokens_per_s")
SUFFIX = " Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."


def write_dataset(data_dir, domain, n, seed):
    """n records of 'how many circles' in the record format prepare_data.py writes, and their manifest entry."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 3)
        image = PILImage.new("RGB", (56, 56), "white")
        draw = ImageDraw.Draw(image)
        for j in range(k):
            draw.ellipse([4 + 16 * j, 20, 16 + 16 * j, 32], fill="red")
        rows.append({"id": f"{domain}-{i}", "domain": domain, "image": image,
                     "problem": "How many circles?" + SUFFIX, "solution": f"<answer>{k}</answer>",
                     "meta": json.dumps({"image_size": [56, 56], "rationale": f"{k} circles"})})
    features = Features({"id": Value("string"), "domain": Value("string"), "image": Image(),
                         "problem": Value("string"), "solution": Value("string"), "meta": Value("string")})
    ds = Dataset.from_list(rows, features=features)
    ds.save_to_disk(os.path.join(data_dir, domain, "train"))
    return {"source": "test", "reward": "math", "role": "train",
            "splits": {"train": {"path": f"{domain}/train", "rows": n, "fingerprint": ds._fingerprint,
                                 "files_sha256": vlm.split_files_sha256(os.path.join(data_dir, domain, "train")),
                                 "n_skipped": 0, "skipped": []}}}


def write_data_dir(path):
    manifest = {"format_version": 1, "evaluation": {"in_domain": [], "out_of_domain": []},
                "datasets": {"syn_count": write_dataset(path, "syn_count", 60, 0),
                             "syn_colorcount": write_dataset(path, "syn_colorcount", 12, 1)}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def run(argv, check=True, wait=True, env=None):
    """Runs a script as a user would, on one thread; Popen when wait is False."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def cold_start(data_dir, out_dir, *extra, check=True):
    """A short cold_start.py (120 steps): enough for rollouts with varied rewards. At 3e-3 (the default's 1e-3 needs
    far more steps to learn the format; format 0.15 after 120 of them), the tower frozen as by default, and the count
    left to RL as the README's RL runs leave it (--answers=random: the rationale counts the circles, the answer is a
    random 0-6), so that GRPO has an accuracy reward to raise (test_grpo_raises_the_accuracy_reward...)."""
    return run([sys.executable, os.path.join(ROOT, "cold_start.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                "--steps=120", "--learning_rate=3e-3", "--answers=random", *extra], check=check)


def train(data_dir, out_dir, init_from, *extra, launcher=(sys.executable,), check=True, wait=True, env=None):
    """Runs train_grpo.py from init_from (a cold start) with small settings (extra overrides them)."""
    argv = [*launcher, os.path.join(ROOT, "train_grpo.py"), f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            f"--init_from={init_from}", "--max_completion_length=24", "--learning_rate=1e-3", "--checkpoint_every=2",
            "--log_samples_every=1", "--prompts_per_step=2", "--micro_batch_size=12", *extra]
    return run(argv, check=check, wait=wait, env=env)


def metrics(out_dir):
    """metrics.jsonl without the timings, which differ between runs."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING_KEYS)} for line in f]


def add_noise(model, scale, seed):
    """A freshly initialised model's logits are nearly flat, so every prompt would greedily give the same
    token; noise on the matrices makes the output depend on the prompt, the image and the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


class Server:
    """A vLLM server on the tiny model, shared by the tests (one start takes about 40 s on 2 cores); started again
    on demand after a test killed it. It serves model_dir's weights at start; tests that sync their own weights
    leave theirs behind, so a test that needs model_dir's calls reload()."""

    def __init__(self, model_dir, log_path):
        self.model_dir, self.log_path, self.process, self.url = model_dir, log_path, None, None

    def ensure_running(self):
        if self.process is None or self.process.poll() is not None:
            self.process, self.url = vllm_cpu_server.start_cpu_server(self.model_dir, self.log_path)

    def reload(self, image_processor):
        """model_dir's weights back in the server, once requests a test abandoned (a client timeout) are over."""
        self.ensure_running()
        self.wait_until_idle()
        vlm.VLLMClient(self.url, image_processor, timeout=60).reload_weights(self.model_dir)

    def wait_until_idle(self, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
                text = response.read().decode()
            busy = sum(float(v) for v in re.findall(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text,
                                                     flags=re.M))
            if busy == 0:
                return
            assert time.monotonic() < deadline, f"the vLLM server still runs {busy:g} requests after {timeout_s} s"
            time.sleep(0.2)

    def signal(self, signum):
        os.killpg(self.process.pid, signum)

    def stop(self):
        if self.process is not None:
            vllm_cpu_server.stop_server(self.process)
