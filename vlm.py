"""
The vision-language policy, shared by train_grpo.py and evaluate.py (as nanoGPT's model.py is shared).

- load_policy(name): a Qwen2-VL / Qwen2.5-VL by hub name or local folder, or "tiny": a 0.8M-parameter Qwen2-VL
  built offline from a config with a locally trained byte-level BPE tokenizer (tests and the CPU default).
- encode_prompts(...): model inputs built from the image processor and the tokenizer directly. transformers 5
  makes a video processor (which needs torchvision) a required part of Qwen2VLProcessor, so AutoProcessor is not
  usable on a CPU box without torchvision; the few lines it would do are here instead.
- generate(...): n samples per prompt (HF generate's sampling, as a plain loop over the KV cache), completion ids.
- save_policy(...): a save_pretrained folder that plain transformers (and vLLM) loads.
"""
import hashlib
import json
import math
import os

import torch
from PIL import Image

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's own chat template (as shipped with Qwen/Qwen2-VL-2B-Instruct), so the tiny model sees prompts
# laid out exactly as the real models do.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny tokenizer's merges are learned from: the chat scaffolding, the answer formats of every reward,
# and the words of the synthetic suite. Byte-level BPE encodes any text; this only makes these texts short.
_TINY_CORPUS = """
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
<|vision_start|><|image_pad|><|vision_end|>
<|im_start|>assistant
<think>
</think>
<answer>
</answer>
Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags.
Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.
Output the final answer in JSON format.
[{"Position": [12, 40, 56, 98], "Confidence": 1}, {"Position": [0, 7, 33, 105], "Confidence": 0.9}]
[[12, 40, 56, 98], [3, 17, 64, 88]] [10, 20, 30, 40] [100, 200, 300, 400]
A. B. C. D. E. F. G. H. (A) (B) (C) (D) The answer is A. The answer is B. Options:
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100 3.5 0.25 1/2 45 degrees
red green blue yellow purple orange black white gray circle square triangle shape shapes object objects
How many are there in the image? Which is left of right of above below the bigger smaller more fewer
count the number of sides colour color bar chart tallest shortest value largest smallest compare
Detect every shape in the image and give its bounding box. Locate the the a an of in is are with and
There are so the answer is Question: Answer: Choices: Hint: which what where how many
Detect every circle in the image and give its bounding box [x1, y1, x2, y2] in pixels.
Detect every square in the image and give its bounding box [x1, y1, x2, y2] in pixels.
Detect every triangle in the image and give its bounding box [x1, y1, x2, y2] in pixels.
Locate the red circle and give its bounding box [x1, y1, x2, y2] in pixels.
Locate the blue square and give its bounding box [x1, y1, x2, y2] in pixels.
Locate the green triangle and give its bounding box [x1, y1, x2, y2] in pixels.
Locate the yellow circle and give its bounding box [x1, y1, x2, y2] in pixels.
How many circles are there in the image? How many squares are there in the image?
How many triangles are there in the image? How many shapes are there in the image?
How many red shapes are there in the image? How many blue shapes are there in the image?
How many green shapes are there in the image? How many yellow shapes are there in the image?
Where is the red circle relative to the blue square?
A. left
B. right
C. above
D. below
Where is the green triangle relative to the yellow circle?
How many sides does the shape have? Which color do you get by mixing the two colors?
What is the value of the red bar? What is the value of the blue bar? What is the value of the green bar?
Are there more circles or squares? Are there more triangles or circles? Are there more red or blue shapes?
the red circle is at the top left the blue square is at the middle right the green triangle is at the center
the yellow circle is at the bottom center the red square is left of the blue circle right of above below the
a triangle has 3 sides a square has 4 sides a circle has 0 sides red and yellow make orange
blue and yellow make green red and blue make purple the red bar has 5 blocks no green shapes
1 red circle, 2 blue squares, 3 green triangles, 1 yellow square
Answer the question with a single word. Answer the question using a single word or phrase.
"""


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, its 14 special tokens and its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
    from tokenizers import Regex

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=768, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Strip the special tokens from the corpus: they are added whole below and must not shape the merges.
    corpus = _TINY_CORPUS
    for token in SPECIAL_TOKENS:
        corpus = corpus.replace(token, " ")
    bpe.train_from_iterator(corpus.splitlines() * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_image_processor():
    from transformers import Qwen2VLImageProcessorPil
    # 28*28 .. 112*112 pixels: a 56 px image becomes 4 image tokens, a 112 px image 16.
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)


def build_tiny_model(tokenizer, seed=0):
    """A randomly initialised 2-layer Qwen2-VL (0.8M parameters): same architecture and code paths as the 2B."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            # mrope_section must sum to head_dim / 2 = 128 / 4 / 2 = 16
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=True,
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model


def load_policy(name_or_path, dtype=torch.float32, seed=0):
    """(model, tokenizer, image_processor) for "tiny", a local save_pretrained folder, or a hub name."""
    if name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed).to(dtype)
        image_processor = build_tiny_image_processor()
    else:
        from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        # The PIL image processor needs no torchvision; it reads the same preprocessor_config.json.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = _read_processor_chat_template(name_or_path) or QWEN2VL_CHAT_TEMPLATE
    # padding_side is not saved with the tokenizer; generation needs prompts padded on the left.
    tokenizer.padding_side = "left"
    return model, tokenizer, image_processor


def _read_processor_chat_template(name_or_path):
    """Some hub folders keep the chat template only in the processor's chat_template.json."""
    path = os.path.join(name_or_path, "chat_template.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("chat_template")
    return None


def save_policy(model, tokenizer, image_processor, out_dir, state_dict=None):
    """A folder that AutoModelForImageTextToText / AutoTokenizer / vLLM load. Not atomic: callers write to a
    temporary folder and rename it. state_dict: weights gathered from ZeRO-3 / FSDP shards, if any."""
    model.save_pretrained(out_dir, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    # vLLM and AutoProcessor build a full Qwen2VLProcessor, whose video half needs its own config file; the
    # values mirror the image processor's (we never feed videos).
    video = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type",)}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=2)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "Qwen2VLProcessor"}, f, indent=2)


def load_weights(model, folder):
    """Load a save_pretrained folder's weights into an existing model of the same architecture (resume)."""
    from transformers import AutoModelForImageTextToText
    saved = AutoModelForImageTextToText.from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


# A folder written by save_policy and then write_checksums is complete; checkpoint_problem() tells an interrupted
# or corrupted one apart, so nothing half-written is ever loaded for training or evaluation.
CHECKSUMS = "checksums.json"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) != CHECKSUMS:
                yield os.path.relpath(path, folder)


def write_checksums(folder):
    sums = {rel: file_sha256(os.path.join(folder, rel)) for rel in sorted(folder_files(folder))}
    tmp = os.path.join(folder, CHECKSUMS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(sums, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, CHECKSUMS))


def checkpoint_problem(folder):
    """None if the folder is a complete, intact checkpoint, else what is wrong with it."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.isfile(path):
        return "incomplete (no checksums.json: the write was interrupted)"
    try:
        with open(path) as f:
            sums = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable checksums.json ({e})"
    for rel, digest in sums.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        if file_sha256(full) != digest:
            return f"corrupt file {rel} (checksum mismatch)"
    return None


def prompt_text(tokenizer, problem, n_images=1):
    """The chat-formatted prompt with one <|image_pad|> per image, ready for expansion."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": problem}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, image_processor, problems, images, max_prompt_length=None):
    """Left-padded model inputs for a batch of (problem, image) pairs, image optional (None).

    Each <|image_pad|> is expanded to grid_t * grid_h * grid_w / merge_size**2 tokens, what Qwen2VLProcessor does.
    Returns input_ids, attention_mask, mm_token_type_ids (1 on image tokens: M-RoPE needs it) and, when there
    are images, pixel_values and image_grid_thw.
    """
    image_list = [img.convert("RGB") for img in images if img is not None]
    vision = image_processor(images=image_list, return_tensors="pt") if image_list else {}
    grid = vision.get("image_grid_thw")
    merge = image_processor.merge_size ** 2
    image_pad = "<|image_pad|>"
    texts, k = [], 0
    for problem, img in zip(problems, images):
        text = prompt_text(tokenizer, problem, n_images=0 if img is None else 1)
        if img is not None:
            text = text.replace(image_pad, image_pad * int(grid[k].prod() // merge), 1)
            k += 1
        texts.append(text)
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = enc["attention_mask"].sum(1)
    if max_prompt_length is not None and int(lengths.max()) > max_prompt_length:
        # Truncating would cut image tokens or the question; a clear error is better than a silent wrong prompt.
        raise ValueError(f"prompt of {int(lengths.max())} tokens exceeds max_prompt_length={max_prompt_length}")
    image_token_id = tokenizer.convert_tokens_to_ids(image_pad)
    batch = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": (enc["input_ids"] == image_token_id).int(),
    }
    if image_list:
        batch["pixel_values"] = vision["pixel_values"]
        batch["image_grid_thw"] = grid
    return batch


def repeat_batch(batch, n):
    """Each prompt n times in a row (for n samples per prompt); pixel rows follow their images."""
    out = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in batch:
        grid = batch["image_grid_thw"]
        rows = grid.prod(-1).tolist()
        chunks = torch.split(batch["pixel_values"], rows)
        out["pixel_values"] = torch.cat([c for c in chunks for _ in range(n)])
        out["image_grid_thw"] = grid.repeat_interleave(n, dim=0)
    return out


@torch.no_grad()
def generate(model, tokenizer, batch, n=1, max_new_tokens=64, temperature=1.0, greedy=False, min_new_tokens=0):
    """n completions per prompt (n: an int, or one count per prompt). Returns a list (len = total samples,
    grouped by prompt) of completion token-id lists, each cut after its first EOS. EOS cannot be sampled before
    min_new_tokens (benchmarks set it to max_new_tokens, so every completion has the same length).

    A plain sampling loop over the KV cache that does what HF generate does for plain sampling (softmax of
    logits / temperature, no top-k / top-p, one multinomial draw per row and step), without generate's
    per-token bookkeeping, which costs more than a small model's forward. Each prompt (and its image) is
    encoded once, and its KV cache copied to its n samples. Given the same RNG state its tokens are HF
    generate's; greedy equals HF's greedy (tests check both). The image placeholder token is never sampled:
    one in a completion would break the training forward, which counts placeholders to place the image
    features (HF generate would need suppress_tokens for the same).
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    never = torch.tensor([tokenizer.convert_tokens_to_ids("<|image_pad|>")], device=device)
    position_ids = prompt_position_ids(model, inputs)
    out = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    # each prompt's state, once per sample
    prompt_of_row = torch.arange(len(inputs["input_ids"]), device=device).repeat_interleave(
        torch.as_tensor(n, device=device))
    out.past_key_values.reorder_cache(prompt_of_row)
    out.logits = out.logits[prompt_of_row]
    attention_mask, position_ids = inputs["attention_mask"][prompt_of_row], position_ids[:, prompt_of_row]
    rows = len(prompt_of_row)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        scores = out.logits[:, -1, :].float()
        scores[:, never] = -math.inf
        if step < min_new_tokens:
            scores[:, eos] = -math.inf
        if greedy:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(scores / temperature, dim=-1), 1).squeeze(1)
        token = token.masked_fill(finished, tokenizer.pad_token_id)  # finished rows only pad
        new_tokens.append(token)
        finished |= token == eos
        if finished.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
        position_ids = position_ids[..., -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=out.past_key_values, use_cache=True)
    completions = torch.stack(new_tokens, dim=1).tolist()
    return [trim_after_eos(ids, tokenizer) for ids in completions]


def prompt_position_ids(model, inputs):
    """(4, rows, prompt length) positions, as HF generate builds them for Qwen2-VL: the plain text position
    (padding at 0) stacked on the three M-RoPE rows (time, height, width) that get_rope_index gives image tokens."""
    attention_mask = inputs["attention_mask"]
    text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if "image_grid_thw" in inputs:
        mrope, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"], attention_mask=attention_mask)
    else:
        mrope = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), mrope], dim=0)


def trim_after_eos(ids, tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)
