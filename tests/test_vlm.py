"""The shared policy module: tiny model, prompt building, generation, save/load."""
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


def test_system_prompt_replaces_the_templates_own(tiny):
    _, tokenizer, image_processor = tiny
    r1 = vlm.system_prompt_text("r1")
    assert r1.startswith("A conversation between User and Assistant.") and vlm.system_prompt_text("default") is None
    plain, with_r1 = (tokenizer.decode(vlm.encode_prompts(tokenizer, image_processor, ["c"], [None],
                                                          system_prompt=system)["input_ids"][0])
                      for system in (None, r1))
    assert plain.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nc")
    assert with_r1.startswith(f"<|im_start|>system\n{r1}<|im_end|>\n<|im_start|>user\nc<|im_end|>\n")
    assert vlm.prompt_text(tokenizer, "c", n_images=0, system_prompt=r1) == with_r1
    with pytest.raises(ValueError, match="system_prompt 'R1' is not one of default, r1"):
        vlm.system_prompt_text("R1")


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
