"""
The vision-language policy, shared by train_grpo.py and evaluate.py (as nanoGPT's model.py is shared).

- load_policy(name): a Qwen2-VL / Qwen2.5-VL by hub name or local folder, or "tiny": a 0.8M-parameter Qwen2-VL
  built offline from a config with a locally trained byte-level BPE tokenizer (tests and the CPU default).
- save_policy / write_checksums / checkpoint_problem: save_pretrained folders that plain transformers (and vLLM)
  loads, and the test that tells a complete one from an interrupted or corrupted one.
- load_manifest: prepare_data.py's index of the datasets; open_split: one of its splits, checked against it.
- encode_prompts(...): model inputs built from the image processor and the tokenizer directly. transformers 5
  makes a video processor (which needs torchvision) a required part of Qwen2VLProcessor, so AutoProcessor is not
  usable on a CPU box without torchvision; the few lines it would do are here instead.
- generate(...): n samples per prompt (HF generate's sampling, as a plain loop over the KV cache), completion ids.
- VLLMClient and friends: rollouts from a vLLM server over plain HTTP, and the weight syncs to it.
"""
import base64
import concurrent.futures
import hashlib
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request

import torch

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


def load_policy(name_or_path, dtype=torch.float32, seed=0, max_pixels=0):
    """(model, tokenizer, image_processor) for "tiny", a local save_pretrained folder, or a hub name.
    seed: the tiny model's initial weights. max_pixels: the image processor's pixel budget per image (0: the
    model's own); training and evaluation set it alike, so a model sees images as large as it was trained on."""
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
    if max_pixels:
        image_processor.size["longest_edge"] = max_pixels
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


def write_json_atomic(path, value, jsonl=False):
    """Serialises first, writes a temporary file, fsyncs, renames: the file at `path` is the old one or the whole
    new one, never a half-written one. jsonl: value is a list, written one JSON line per item."""
    text = "".join(json.dumps(v) + "\n" for v in value) if jsonl else json.dumps(value, indent=1) + "\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_manifest(data_dir):
    """prepare_data.py's index of the datasets (both training and evaluation read only what it lists)."""
    path = os.path.join(data_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found: run `python prepare_data.py` first (or set --data_dir)")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e})")
    if manifest.get("pending_splits"):  # the splits it lists are not all that was asked for
        raise SystemExit(f"error: {path}: the prepare_data.py run that builds {', '.join(manifest['pending_splits'])} "
                         "has not finished (killed, or still running): run that command again, or wait for it")
    return manifest


REBUILD = "run prepare_data.py again with the options that built it (it rebuilds only the splits that need it)"


def split_files_sha256(folder):
    """sha256 over the Arrow files of a save_to_disk folder, in the order its state.json lists them: the split's
    bytes as prepare_data.py wrote them. Reading them costs ~16 ms for a 3,000-record synthetic split (3 MB);
    recomputing the manifest's content fingerprint (every image decoded) took 3.3 s for the same split."""
    with open(os.path.join(folder, "state.json")) as f:
        names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name} {file_sha256(os.path.join(folder, name))}\n".encode())
    return digest.hexdigest()


def open_split(data_dir, manifest, domain, split):
    """A split the manifest lists, loaded once its files are checked to be the ones prepare_data.py wrote: a deleted,
    cut or changed split is a one-line error (naming it, and the rebuild), never a traceback or other data."""
    from datasets import load_from_disk
    manifest_path = os.path.join(data_dir, "manifest.json")
    entry = manifest["datasets"][domain]["splits"][split]
    folder = os.path.join(data_dir, entry["path"])
    where = f"{folder} ({domain}/{split} in {manifest_path})"
    if "files_sha256" not in entry:
        raise SystemExit(f"error: {manifest_path} lists {domain}/{split} without files_sha256 (an older "
                         f"prepare_data.py wrote it), so its data cannot be checked: {REBUILD}")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {where} does not exist: {REBUILD}")
    try:
        digest = split_files_sha256(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {where} is not a complete dataset folder ({e}): {REBUILD}")
    if digest != entry["files_sha256"]:
        raise SystemExit(f"error: {where} holds other data than the manifest lists (its files changed after "
                         f"prepare_data.py wrote them): {REBUILD}")
    return load_from_disk(folder)


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


def vision_token_ids(tokenizer):
    """Tokens a completion must never contain: an <|image_pad|> in a completion makes Qwen2-VL's forward count
    one image position too many when the trainer scores it. Both rollout engines suppress them."""
    return tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                            "<|image_pad|>", "<|video_pad|>"])


@torch.no_grad()
def generate(model, tokenizer, batch, n=1, max_new_tokens=64, temperature=1.0, greedy=False, min_new_tokens=0):
    """n completions per prompt (n: an int, or one count per prompt). Returns a list (len = total samples,
    grouped by prompt) of completion token-id lists, each cut after its first EOS. EOS cannot be sampled before
    min_new_tokens (benchmarks set it to max_new_tokens, so every completion has the same length).

    A plain sampling loop over the KV cache that does what HF generate does for plain sampling (softmax of
    logits / temperature, no top-k / top-p, one multinomial draw per row and step), without generate's
    per-token bookkeeping, which costs more than a small model's forward. Each prompt (and its image) is
    encoded once, and its KV cache copied to its n samples. Given the same RNG state its tokens are HF
    generate's; greedy equals HF's greedy (tests check both). Vision tokens are never sampled
    (vision_token_ids), as the vLLM client suppresses them too.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    never = torch.tensor(vision_token_ids(tokenizer), device=device)
    prompt_of_row = torch.arange(len(inputs["input_ids"]), device=device).repeat_interleave(
        torch.as_tensor(n, device=device))
    out, attention_mask, position_ids = prefill(model, inputs, prompt_of_row)
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


def prefill(model, prompts, prompt_of_row):
    """Runs each distinct prompt (and its image) through the model once and copies its KV cache to the rows that
    continue it (prompt_of_row[i]: the prompt of row i), so G completions of a prompt cost one prompt forward.
    Returns the model output (logits of the last prompt position and the cache, one row per completion) and the
    attention mask and (4, rows, length) positions the completion tokens continue. The G copies share the
    prompt's positions and attention states: the same computation as running prompt + completion G times, and
    the gradient through the copies is the sum the G runs would give. Used by generate (sampling) and
    completion_logprobs (training)."""
    from accelerate.utils import extract_model_from_parallel
    positions = prompt_position_ids(extract_model_from_parallel(model), prompts)  # DDP hides .model
    out = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)
    out.past_key_values.reorder_cache(prompt_of_row)
    out.logits = out.logits[prompt_of_row]
    return out, prompts["attention_mask"][prompt_of_row], positions[:, prompt_of_row]


def completion_logprobs(model, prompts, completion_ids, completion_mask, temperature, prompt_of_row=None):
    """Per-token log-probs of the completions given their prompts. prompts: left-padded, one row per distinct
    prompt; prompt_of_row[i]: the prompt row of completion i (default: row i). The completions run on top of
    their prompt's copied KV cache (prefill)."""
    if prompt_of_row is None:
        prompt_of_row = torch.arange(len(completion_ids), device=completion_ids.device)
    out, attention_mask, positions = prefill(model, prompts, prompt_of_row)
    logits = out.logits  # the last prompt position predicts the first completion token
    n = completion_ids.shape[1]
    if n > 1:  # the other completion tokens, on top of the prompt's cache; the last one predicts nothing needed
        attention_mask = torch.cat([attention_mask, completion_mask[:, :-1]], dim=1)
        steps = torch.arange(1, n, device=positions.device)
        out = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask,
                    position_ids=positions[..., -1:] + steps, past_key_values=out.past_key_values, use_cache=True)
        logits = torch.cat([logits, out.logits], dim=1)
    return selective_log_softmax(logits / temperature, completion_ids)


def selective_log_softmax(logits, ids):
    """log softmax(logits)[ids] row by row, never materialising the full (B, T, V) log-probabilities."""
    out = []
    for row_logits, row_ids in zip(logits, ids):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def pad_completions(completions, pad_id, device):
    """Right-padded (B, T) ids and mask; T = the longest completion (>= 1)."""
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), length), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    return ids.to(device), mask.to(device)


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



# ---------------------------------------------------------------------------------------------------------------
# Rollouts from a vLLM server. The server lives in its own environment (scripts/setup_vllm_cpu.sh and
# scripts/serve_vllm_cpu.sh on CPU, `vllm serve` on a GPU: README, "Rollouts from a vLLM server"); this side
# speaks plain HTTP through the standard library, so the training environment needs no vLLM. Every call has a
# timeout and bounded retries, so a dead or hung server ends a run with an error instead of a silent hang.


class VLLMServerError(RuntimeError):
    """The vLLM server is missing, refused a request, died, or did not answer in time."""


def save_for_vllm(model, tokenizer, image_processor, out_dir):
    """The folder to start a vLLM server on: save_policy's folder with lm_head stored as its own copy of the
    word embedding (tie_word_embeddings false), in one model.safetensors. A weight reload loads a tied lm_head
    only through the embedding it shares, and vLLM's CPU backend computes logits from a packed copy made at
    start, so after a sync a tied model answered with its old output layer (vllm-cpu 0.32). Untied, every
    write_weights file carries lm_head and the served model equals the trainer's."""
    save_policy(model, tokenizer, image_processor, out_dir)
    for name in os.listdir(out_dir):  # save_pretrained's weight files (maybe sharded) give way to one file
        if name.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, name))
    write_weights(model.state_dict(), out_dir)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = False
    if "text_config" in config:
        config["text_config"]["tie_word_embeddings"] = False
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def write_weights(state_dict, weights_dir):
    """Writes state_dict as weights_dir/model.safetensors atomically (temporary file, then rename), the file
    VLLMClient.reload_weights points the server at: the server never reads a half-written file."""
    from safetensors.torch import save_file
    os.makedirs(weights_dir, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = (tensor.data_ptr(), tuple(tensor.shape))
        # safetensors refuses two names on one storage; tied weights (lm_head = embedding) get a copy each.
        tensors[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    path = os.path.join(weights_dir, "model.safetensors")
    # The temporary name does not end in .safetensors, so a server listing the folder never picks it up.
    tmp_path = path + f".tmp{os.getpid()}"
    save_file(tensors, tmp_path, metadata={"format": "pt"})
    os.replace(tmp_path, path)
    return path


def server_image(image, image_processor):
    """The image at the exact size image_processor resizes it to, resized the same way (PIL). The server's own
    image processor resizes with torchvision, which differs by up to one intensity level; an image already at
    its target size is left alone by both, so server and trainer see the same pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width,
                                 factor=image_processor.patch_size * image_processor.merge_size,
                                 min_pixels=image_processor.size["shortest_edge"],
                                 max_pixels=image_processor.size["longest_edge"])
    return image.resize((width, height), resample=image_processor.resample)


def image_data_uri(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes exactly these pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMClient:
    """A `vllm serve` process reached over HTTP: health check, batched generation with images, weight reload.

    image_processor: the trainer's (load_policy's); images are resized with it before they are sent.
    timeout: seconds one HTTP call may wait for its answer. retries: further attempts after a refused connection,
    a dropped connection or a 5xx answer, waiting backoff * 1, 2, 4, ... seconds in between. A call that times
    out is not retried (a hung server would only multiply the wait), so any call ends, at the latest, after
    timeout + backoff * (2**retries - 1) seconds.
    """

    def __init__(self, url, image_processor, timeout=300.0, retries=3, backoff=1.0):
        self.url = url.rstrip("/")
        self.image_processor = image_processor
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def _call(self, method, path, body=None, retry_server_errors=True):
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        failure = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:1000]
                if e.code < 500 or not retry_server_errors:  # retrying the same request cannot help
                    raise VLLMServerError(f"{method} {url} failed (HTTP {e.code}): {detail}") from None
                failure = f"HTTP {e.code}: {detail}"
            except TimeoutError:
                raise VLLMServerError(f"{method} {url}: no answer within {self.timeout:g} s; the vLLM server is "
                                      "hung or overloaded (raise the timeout if it is only slow)") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise VLLMServerError(f"{method} {url}: no connection within {self.timeout:g} s") from None
                failure = str(e.reason)
            except (ConnectionError, http.client.HTTPException) as e:  # the server went away mid-answer
                failure = f"{type(e).__name__}: {e}"
            except json.JSONDecodeError as e:
                raise VLLMServerError(f"{method} {url}: the answer is not JSON ({e})") from None
        raise VLLMServerError(f"{method} {url} failed {self.retries + 1} times; last: {failure}")

    def check_health(self, weight_sync=True, wait_s=0.0):
        """Call once at start: a clear error when no server answers (within wait_s seconds, for a server
        started alongside) or, with weight_sync, when it was started without the development endpoints that
        reload weights. Returns the served model's description from /v1/models ("id", "max_model_len")."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._call("GET", "/health")
                model = self._call("GET", "/v1/models")["data"][0]
                break
            except VLLMServerError as e:
                if time.monotonic() >= deadline:
                    raise VLLMServerError(
                        f"no vLLM server answers at {self.url} ({e}). Start one first, on CPU with "
                        "`scripts/serve_vllm_cpu.sh MODEL_DIR PORT` (after `bash scripts/setup_vllm_cpu.sh`), on a "
                        "GPU with `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL_DIR --host 127.0.0.1 --port PORT ...`; "
                        "MODEL_DIR written by vlm.save_for_vllm (README: Rollouts from a vLLM server)") from None
                time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
        if weight_sync:
            try:
                self._call("GET", "/is_sleeping")  # one of the development endpoints
            except VLLMServerError as e:
                raise VLLMServerError(f"the vLLM server at {self.url} cannot reload weights ({e}): restart it with "
                                      "VLLM_SERVER_DEV_MODE=1 in its environment") from None
        return model

    def _chat_body(self, problem, image, n, max_new_tokens, temperature, greedy, ignore_eos, logprobs,
                   suppress_token_ids):
        content = [] if image is None else [
            {"type": "image_url", "image_url": {"url": image_data_uri(server_image(image, self.image_processor))}}]
        content.append({"type": "text", "text": problem})
        # Every sampling parameter is sent, so the server's defaults (a model's generation_config can carry
        # top_k, top_p or repetition_penalty) never apply: the samples come from the plain softmax the trainer
        # scores them with.
        return {
            "messages": [{"role": "user", "content": content}],
            "n": 1 if greedy else n, "max_tokens": max_new_tokens,
            "temperature": 0.0 if greedy else temperature, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "ignore_eos": ignore_eos, "return_token_ids": True, "logprobs": logprobs,
            "logit_bias": {str(token): -100.0 for token in suppress_token_ids},
        }

    def generate(self, problems, images, n=1, max_new_tokens=64, temperature=1.0, greedy=False, prompt_ids=None,
                 suppress_token_ids=(), ignore_eos=False, logprobs=False):
        """n completions for each (problem, image) pair (image may be None), as vlm.generate returns them: a
        list of prompts * n completion token-id lists, grouped by prompt, each ending with the EOS token
        (<|im_end|>) when it stopped. One request per prompt, all in flight at once so the server batches them.

        prompt_ids: the trainer's own prompt token ids (unpadded, one list per prompt); when given, a server
        that tokenized a prompt differently (another chat template, tokenizer or image size) is an error.
        suppress_token_ids: tokens never to sample, such as the vision tokens: an <|image_pad|> inside a
        completion makes HF's Qwen2-VL count one image position too many when the trainer scores it.
        ignore_eos: generate max_new_tokens tokens whatever comes (benchmarks). logprobs: also return the
        server's log-probability of each sampled token (of the raw model, before temperature), as a
        (token ids, logprobs) pair.
        """
        bodies = [self._chat_body(problem, image, n, max_new_tokens, temperature, greedy, ignore_eos, logprobs,
                                  suppress_token_ids)
                  for problem, image in zip(problems, images, strict=True)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(32, len(bodies)))) as pool:
            answers = list(pool.map(lambda body: self._call("POST", "/v1/chat/completions", body), bodies))
        completions, completion_logprobs = [], []
        for i, answer in enumerate(answers):
            if prompt_ids is not None and answer["prompt_token_ids"] != list(prompt_ids[i]):
                raise VLLMServerError(_prompt_mismatch(i, list(prompt_ids[i]), answer["prompt_token_ids"], self.url))
            choices = sorted(answer["choices"], key=lambda choice: choice["index"])
            if greedy:  # vLLM refuses n > 1 without sampling; the n greedy completions are one and the same
                choices = choices * n
            completions += [choice["token_ids"] for choice in choices]
            if logprobs:
                completion_logprobs += [[t["logprob"] for t in choice["logprobs"]["content"]] for choice in choices]
        return (completions, completion_logprobs) if logprobs else completions

    def generate_for(self, tokenizer, problems, images, max_prompt_length=None, **options):
        """generate() as the trainer and the evaluator call it: the prompts are encoded with the trainer's own
        tokenizer and image processor (a prompt over max_prompt_length is an error), so a server that tokenizes
        one differently is an error, and the vision tokens are never sampled. options: generate()'s."""
        batch = encode_prompts(tokenizer, self.image_processor, problems, images, max_prompt_length)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        return self.generate(problems, images, prompt_ids=prompt_ids, suppress_token_ids=vision_token_ids(tokenizer),
                             **options)

    def reload_weights(self, weights_dir):
        """Points the server at weights_dir/model.safetensors (write_weights) and returns once it serves them.
        Call it between generate calls: a reload lands between two decoding steps, so a request in flight
        would finish with the new weights. The folder must be readable by the server under the same path."""
        weights_dir = os.path.abspath(weights_dir)
        if not os.path.isfile(os.path.join(weights_dir, "model.safetensors")):
            # Checked here because a reload that fails inside vLLM leaves its model half-loaded and kills it.
            raise FileNotFoundError(f"{weights_dir}/model.safetensors does not exist; write it with write_weights")
        try:
            self._call("POST", "/collective_rpc", retry_server_errors=False,
                       body={"method": "reload_weights", "kwargs": {"weights_path": weights_dir}})
        except VLLMServerError as e:
            raise VLLMServerError(f"weight reload from {weights_dir} failed ({e}); a failed reload leaves the "
                                  "server's model half-loaded: restart the server") from None
        # The encoder cache holds image embeddings computed with the old vision weights; vLLM 0.32 clears
        # the worker's copy on reload but not the scheduler's, and the next request with an image seen before
        # then crashes the engine ("Encoder cache miss"). The prefix cache holds keys/values of the old weights.
        self._call("POST", "/reset_encoder_cache")
        answer = self._call("POST", "/reset_prefix_cache")
        if not (answer or {}).get("success"):
            raise VLLMServerError(f"POST {self.url}/reset_prefix_cache did not reset the cache ({answer}): "
                                  "requests were running during the reload; reload between generate calls")


def _prompt_mismatch(index, expected, served, url):
    at = next((k for k, (a, b) in enumerate(zip(expected, served)) if a != b), min(len(expected), len(served)))
    return (f"prompt {index}: the vLLM server at {url} tokenized it differently from encode_prompts "
            f"({len(served)} tokens vs {len(expected)}, first difference at token {at}: server "
            f"{served[at:at + 8]} vs trainer {expected[at:at + 8]}); serve the folder of the model the trainer "
            "loads (same tokenizer, chat template and preprocessor_config.json)")
