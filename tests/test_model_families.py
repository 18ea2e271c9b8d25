"""The model families users run besides Qwen2-VL: tiny Qwen2.5-VL and Qwen3-VL, built offline from their configs,
through GRPO steps, a checkpoint reload and evaluation, as a user would launch them (tests/tiny_runs.py), and
served by vLLM (skipped without .venv-vllm). Their generation and log-probabilities are checked against
transformers' own in test_vlm.py and test_train_grpo_units.py."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText

import evaluate
import vllm_cpu_server
import vlm
from test_evaluate import write_test_sets
from test_vllm_server import add_noise
from tiny_runs import ROOT, metrics, train

FAMILIES = {"tiny-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration", "tiny-qwen3-vl": "Qwen3VLForConditionalGeneration"}


@pytest.fixture(scope="module")
def eval_data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data")
    write_test_sets(str(path))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_reloads_and_evaluates(family, data_dir, eval_data_dir, tmp_path):
    # From the random model: it earns no reward, so these steps run every part of the loop without moving
    # the weights; the gradients of each family are checked in test_train_grpo_units.py.
    out = tmp_path / "run"
    train(data_dir, out, family, "--max_steps=3", "--checkpoint_every=3", "--max_completion_length=8",
          "--log_samples_every=0")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["start_from"] == family
    checkpoint = out / "ckpt-000003"
    assert vlm.checkpoint_problem(str(checkpoint)) is None
    # the checkpoint is the family's own model for plain transformers ...
    assert type(AutoModelForImageTextToText.from_pretrained(checkpoint)).__name__ == FAMILIES[family]
    # ... and for evaluate.py, which scores it on every test set of the manifest
    evaluate.main([str(checkpoint), "--data_dir", str(eval_data_dir), "--limit", "1"])
    results = json.loads((out / "eval" / "ckpt-000003" / "limit-1" / "results.json").read_text())
    assert {name: bench["n"] for name, bench in results["benchmarks"].items()} == {
        "syn_count/test": 1, "syn_ground/test": 1, "chartqa/test": 1, "mmmu/val": 1}


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv-vllm", "bin", "vllm")),
                    reason=".venv-vllm is missing: `bash scripts/setup_vllm_cpu.sh` builds it (CI does)")
# Each family needs a vLLM server of its own (~1 minute to start on 2 cores), which would push the suite past its
# 12-minute budget; Qwen2-VL's server tests run in every CI run, these two on request.
@pytest.mark.skipif(not os.environ.get("MODOMODO_SLOW_TESTS"),
                    reason="starts a vLLM server per family (~2 min in all): set MODOMODO_SLOW_TESTS=1 to run it")
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_serves_the_family_as_the_trainer_generates(family, tmp_path):
    model, tokenizer, image_processor = vlm.load_policy(family)
    vlm.save_for_vllm(model, tokenizer, image_processor, tmp_path / "served")
    process, url = vllm_cpu_server.start_cpu_server(tmp_path / "served", tmp_path / "vllm.log")
    try:
        client = vlm.VLLMClient(url, image_processor, timeout=120)
        add_noise(model, 0.1, seed=1)  # a trained policy: its greedy tokens depend on the prompt and the image
        vlm.write_weights(model.state_dict(), tmp_path / "synced")
        client.reload_weights(tmp_path / "synced")
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(56, 56), (80, 100)]]
        problems, images = ["How many shapes?", "How many shapes?", "What colour?"], images + [None]
        batch = vlm.encode_prompts(tokenizer, image_processor, problems, images)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        # prompt_ids: the server must tokenize every prompt, image tokens included, as encode_prompts does
        served = client.generate(problems, images, max_new_tokens=16, greedy=True, prompt_ids=prompt_ids,
                                 suppress_token_ids=vlm.vision_token_ids(tokenizer))  # as vlm.generate does
        assert served == vlm.generate(model, tokenizer, batch, max_new_tokens=16, greedy=True)
        assert served[0] != served[1]  # same question, another image
    finally:
        vllm_cpu_server.stop_server(process)
