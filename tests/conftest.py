import pytest
import torch

import vlm
from tiny_runs import Server, add_noise, cold_start, write_data_dir


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Two small training domains in the record format (60 and 12 rows)."""
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def cold_start_dir(tmp_path_factory, data_dir):
    """One short cold start shared by every training run of the session, so rollouts earn varied rewards (a
    random model earns none)."""
    path = tmp_path_factory.mktemp("cold") / "base"
    cold_start(data_dir, path)
    return path


@pytest.fixture(scope="session")
def noisy_policy():
    """The tiny model with noise on its matrices (output that depends on prompt, image and weights) and a larger
    <|im_end|> row: some greedy completions stop early, others run to the limit."""
    model, tokenizer, image_processor = vlm.load_policy("tiny")
    add_noise(model, 0.1, seed=1)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] *= 3
    return model, tokenizer, image_processor


@pytest.fixture(scope="session")
def vllm_server(noisy_policy, tmp_path_factory):
    """One vLLM server for the whole session, serving noisy_policy (vlm.save_for_vllm's folder). Only tests that
    need it start it, and they skip where .venv-vllm is missing."""
    folder = tmp_path_factory.mktemp("vllm")
    vlm.save_for_vllm(*noisy_policy, str(folder / "model"))
    server = Server(str(folder / "model"), str(folder / "server.log"))
    try:
        server.ensure_running()
        yield server
    finally:
        server.stop()
