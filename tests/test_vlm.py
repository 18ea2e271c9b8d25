"""The shared policy module: tiny model, prompt building, generation, save/load."""
import json
import os

import pytest
import torch
from PIL import Image

import vlm


@pytest.fixture(scope="module")
def tiny():
    return vlm.load_policy("tiny")


def test_tiny_model_is_small_qwen2vl(tiny):
    model, tokenizer, _ = tiny
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 1_500_000
    assert model.config.text_config.vocab_size >= len(tokenizer)
    for token in vlm.SPECIAL_TOKENS:  # every Qwen special token is one id, never split
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_tiny_is_deterministic():
    a, _, _ = vlm.load_policy("tiny", seed=3)
    b, _, _ = vlm.load_policy("tiny", seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_image_pads_expand_to_grid_tokens(tiny):
    _, tokenizer, image_processor = tiny
    # 56 px -> 4x4 patches of 14 px -> merged 2x2 -> 4 tokens; 112 px -> 16 tokens; no image -> none.
    images = [Image.new("RGB", (56, 56)), Image.new("RGB", (112, 112), "red"), None]
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a", "b", "c"], images)
    pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == pad_id).sum(1).tolist() == [4, 16, 0]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad_id).int())
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert batch["pixel_values"].shape[0] == 16 + 64
    # left padding: every row ends with the generation prompt
    assert (batch["attention_mask"][:, -1] == 1).all()
    text = tokenizer.decode(batch["input_ids"][2], skip_special_tokens=False)
    assert text.replace("<|endoftext|>", "").endswith("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_over_limit_is_an_error(tiny):
    _, tokenizer, image_processor = tiny
    with pytest.raises(ValueError, match="max_prompt_length=10"):
        vlm.encode_prompts(tokenizer, image_processor, ["hello"], [None], max_prompt_length=10)


def test_repeat_batch_keeps_pixels_with_their_prompt(tiny):
    _, tokenizer, image_processor = tiny
    images = [Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (112, 112), "red")]
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a", "b"], images)
    rep = vlm.repeat_batch(batch, 3)
    assert rep["input_ids"].shape[0] == 6
    assert rep["image_grid_thw"].tolist() == [[1, 4, 4]] * 3 + [[1, 8, 8]] * 3
    assert torch.equal(rep["pixel_values"][:16], batch["pixel_values"][:16])
    assert torch.equal(rep["pixel_values"][32:48], batch["pixel_values"][:16])
    assert torch.equal(rep["pixel_values"][48:112], batch["pixel_values"][16:])


def test_generate_groups_samples_and_stops_at_eos(tiny):
    model, tokenizer, image_processor = tiny
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a", "b"], [Image.new("RGB", (56, 56)), None])
    torch.manual_seed(0)
    outs = vlm.generate(model, tokenizer, batch, n=3, max_new_tokens=8)
    assert len(outs) == 6 and all(1 <= len(o) <= 8 for o in outs)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(eos not in o[:-1] for o in outs)


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tokenizer, image_processor = tiny
    vlm.save_policy(model, tokenizer, image_processor, tmp_path)
    for name in ["model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"]:
        assert (tmp_path / name).is_file(), name
    model2, tokenizer2, image_processor2 = vlm.load_policy(str(tmp_path))
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a"], [Image.new("RGB", (56, 56), "green")])
    batch2 = vlm.encode_prompts(tokenizer2, image_processor2, ["a"], [Image.new("RGB", (56, 56), "green")])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values"], batch2["pixel_values"])
    out1 = vlm.generate(model, tokenizer, batch, greedy=True, max_new_tokens=12)
    out2 = vlm.generate(model2, tokenizer2, batch2, greedy=True, max_new_tokens=12)
    assert out1 == out2


def favour_token(model, token_id, boost=1e4):
    """Make token_id the most likely next token everywhere (a forward hook on the LM head); returns the handle."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., token_id] += boost
        return logits
    return model.lm_head.register_forward_hook(hook)


def test_image_placeholder_is_never_generated(tiny):
    # A sampled <|image_pad|> would make the training forward fail: it counts placeholders to place image features.
    model, tokenizer, image_processor = tiny
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a"], [Image.new("RGB", (56, 56))])
    handle = favour_token(model, image_pad)
    try:
        torch.manual_seed(0)
        outs = vlm.generate(model, tokenizer, batch, n=2, max_new_tokens=6) + \
            vlm.generate(model, tokenizer, batch, greedy=True, max_new_tokens=6)
    finally:
        handle.remove()
    assert len(outs) == 3 and all(len(o) == 6 and image_pad not in o for o in outs)


def test_min_new_tokens_holds_back_eos(tiny):
    model, tokenizer, image_processor = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = vlm.encode_prompts(tokenizer, image_processor, ["a", "b"], [Image.new("RGB", (56, 56)), None])
    handle = favour_token(model, eos)
    try:
        eager = vlm.generate(model, tokenizer, batch, greedy=True, max_new_tokens=8)
        held = vlm.generate(model, tokenizer, batch, greedy=True, max_new_tokens=8, min_new_tokens=3)
        full = vlm.generate(model, tokenizer, batch, greedy=True, max_new_tokens=8, min_new_tokens=8)
    finally:
        handle.remove()
    assert eager == [[eos], [eos]]
    assert [len(o) for o in held] == [4, 4] and all(o[-1] == eos and eos not in o[:-1] for o in held)
    assert [len(o) for o in full] == [8, 8] and all(eos not in o for o in full)


def hf_generate(model, tokenizer, batch, n, max_new_tokens, greedy):
    """transformers' own generate, configured as vlm.generate samples: the reference it must reproduce."""
    inputs = vlm.repeat_batch(batch, n)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling,
                         suppress_tokens=vlm.vision_token_ids(tokenizer),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    return [vlm.trim_after_eos(ids, tokenizer) for ids in out[:, inputs["input_ids"].shape[1]:].tolist()]


@pytest.fixture(scope="module")
def mixed_batch(tiny):
    """Prompts of different lengths (so left padding), two image sizes and no image: every M-RoPE case."""
    _, tokenizer, image_processor = tiny
    images = [Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (112, 84), "red"), None]
    return vlm.encode_prompts(tokenizer, image_processor, ["How many circles?", "a", "Which is left of the other?"],
                              images)


def test_greedy_equals_hf_generate(tiny, mixed_batch):
    model, tokenizer, _ = tiny
    ours = vlm.generate(model, tokenizer, mixed_batch, greedy=True, max_new_tokens=20)
    assert ours == hf_generate(model, tokenizer, mixed_batch, 1, 20, greedy=True)
    assert [len(o) for o in ours] == [20, 20, 20]  # the random model never says EOS: every step compared


def test_samples_equal_hf_generate_given_the_seed(tiny, mixed_batch):
    # Same softmax, same multinomial draws in the same order: the same tokens, not just the same distribution.
    model, tokenizer, _ = tiny
    torch.manual_seed(7)
    ours = vlm.generate(model, tokenizer, mixed_batch, n=3, max_new_tokens=16)
    torch.manual_seed(7)
    assert ours == hf_generate(model, tokenizer, mixed_batch, 3, 16, greedy=False)
    assert len({tuple(o) for o in ours}) == 9  # and they are real samples


def test_samples_per_prompt_may_differ(tiny, mixed_batch):
    # Each prompt is encoded once and its state copied to its samples: greedy samples of a prompt are its greedy
    # completion, in prompt order.
    model, tokenizer, _ = tiny
    one_each = vlm.generate(model, tokenizer, mixed_batch, greedy=True, max_new_tokens=10)
    outs = vlm.generate(model, tokenizer, mixed_batch, n=[2, 1, 3], greedy=True, max_new_tokens=10)
    assert outs == [one_each[0]] * 2 + [one_each[1]] + [one_each[2]] * 3


# --- log-probs of completions (the training forward) ---

def test_selective_log_softmax_matches_full():
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    full = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(vlm.selective_log_softmax(logits, ids), full, atol=1e-6)


def full_sequence_logprobs(model, prompts, ids, mask, temperature):
    """The plain way: each completion appended to its own copy of its prompt, one forward over all of it."""
    inputs = dict(input_ids=torch.cat([prompts["input_ids"], ids], 1),
                  attention_mask=torch.cat([prompts["attention_mask"], mask], 1),
                  mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(ids).int()], 1),
                  pixel_values=prompts["pixel_values"], image_grid_thw=prompts["image_grid_thw"])
    logits = model(**inputs, logits_to_keep=ids.shape[1] + 1, use_cache=False).logits[:, :-1]
    return vlm.selective_log_softmax(logits / temperature, ids)


def test_shared_prompt_logprobs_and_gradients_equal_the_full_sequence_ones():
    from PIL import Image
    model, tokenizer, image_processor = vlm.load_policy("tiny")
    model.model.visual.requires_grad_(False)
    problems, images = ["How many circles?", "a"], [Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (112, 84))]
    prompt_of_row = torch.tensor([0, 0, 0, 1, 1])
    # completions of 6, 4, 1, 6 and 3 ordinary tokens, right-padded
    torch.manual_seed(0)
    ids, mask = vlm.pad_completions([torch.randint(20, 400, (k,)).tolist() for k in (6, 4, 1, 6, 3)],
                                   tokenizer.pad_token_id, "cpu")
    shared = vlm.encode_prompts(tokenizer, image_processor, problems, images)
    per_row = vlm.encode_prompts(tokenizer, image_processor, [problems[p] for p in prompt_of_row],
                                 [images[p] for p in prompt_of_row])

    def logprobs_and_gradients(compute):
        model.zero_grad()
        logp = compute() * mask
        logp.sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    reference, reference_grads = logprobs_and_gradients(lambda: full_sequence_logprobs(model, per_row, ids, mask, 0.7))
    for prompts, rows in [(shared, prompt_of_row), (per_row, None)]:
        logp, grads = logprobs_and_gradients(lambda: vlm.completion_logprobs(model, prompts, ids, mask, 0.7, rows))
        assert torch.allclose(logp, reference, atol=1e-5)
        for a, b in zip(grads, reference_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # float32 summation order; gradients reach ~8
    assert (reference[2, 1:] == 0).all() and reference[2, 0] < 0  # the one-token completion is scored too


def test_pad_completions():
    ids, mask = vlm.pad_completions([[5, 6, 7], [8], []], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]



# ----------------------------------------------------------------------------------------------------------------
# results and settings are never half-written

def test_write_json_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    vlm.write_json_atomic(path, {"score": 1})
    with pytest.raises(TypeError):
        vlm.write_json_atomic(path, {"score": 2, "bad": object()})  # fails while serialising

    def disk_full(fd):
        raise OSError("No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        vlm.write_json_atomic(path, {"score": 3})  # fails after the temporary file was written
    assert json.load(open(path)) == {"score": 1}
    assert os.listdir(tmp_path) == ["results.json"]
