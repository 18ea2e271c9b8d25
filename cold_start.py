"""
Supervised cold start: the tiny model learns to imitate the reference answers, so that GRPO's rollouts earn rewards.

    python prepare_data.py && python cold_start.py && python train_grpo.py   # train_grpo.py starts from its output
    python cold_start.py --help                                              # every setting, its default and meaning

A randomly initialised tiny model earns no reward, and GRPO learns nothing from a group whose rewards are all
equal, so the CPU testbed first trains it on the reference answers of every training domain: "<think>" holds the
record's rationale, "<answer>" its answer. Real Instruct models already follow the format; the paper starts GRPO
from Qwen2-VL-2B-Instruct directly (train_grpo.py --init_from=Qwen/Qwen2-VL-2B-Instruct), with no cold start.

The domains are sampled uniformly (or at domain_weights) with this script's own seed, so the result depends neither
on the mixture nor on the seed of the GRPO runs that start from it: every run of a mixture study starts from the
same weights.

Output: out_dir, a checkpoint folder (save_pretrained + checksums.json, written to out_dir.partial and then renamed)
with cold_start.json: the settings and the training data's fingerprints it was made from, and its final loss. A
rerun finds it: with the same settings and data it does nothing ("up to date"); with other ones it is an error
naming them, since GRPO runs may have started from that folder (delete it or choose another --out_dir).
"""
import json
import os
import random
import shutil
import sys

# Idle OpenMP threads that spin instead of sleeping make torch 10-20x slower when another program uses a core
# (measured: GRPO 9-17 s/step instead of 0.6 s); set before torch loads, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One torch thread: at the tiny testbed's size the per-op work is too small to split, and one thread beat two on a
# 2-core machine (wall time, same hour: 30 GRPO steps 0.70x, evaluation 0.60x, cold start 0.92x). torchrun sets
# the same default for its workers; OMP_NUM_THREADS=N gives a CPU run with a larger model more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from tqdm import tqdm

import prepare_data
import rewards
import vlm
from train_grpo import load_train_split, read_settings, record_fields, resolve_mixture, training_domains

# --- config -----------------------------------------------------------------------------------------------
# Override: python cold_start.py [config.json ...] [--key=value ...]; main() then reads each by its name.
out_dir = "out/cold_start"        # the checkpoint folder train_grpo.py's init_from reads by default
data_dir = "data"                 # prepare_data.py output; every training domain of its manifest is used
init_from = "tiny"                # "tiny", a hub name or a save_pretrained folder
seed = 0                          # this stage's own: the tiny model's initial weights and the examples drawn
steps = 2000                      # ~9.5 min on one CPU core: at 900 steps the model's use of its image is not robust
batch_size = 16                   # examples per step
domain_weights = "uniform"        # how often each training domain is drawn (train_grpo.py's --mixture syntax):
                                  # the cold start's own, the same for every run of a study that starts from it
learning_rate = 1e-3              # AdamW, linear decay to 0; at 3e-3 the 2-layer model does not learn to look
train_vision = False              # True trains the vision tower too: a random tower then collapses (every picture
                                  # looks alike to the text; docs/testbed_log.md, item 3)
vision_steps = 0                  # a tiny model's random tower is first pretrained, alone, for this many steps (32
                                  # scenes each) to say what each image token holds and where it is, as a real
                                  # model's tower is pretrained (docs/testbed_log.md item 13); 0: random
grad_clip = 1.0
max_pixels = 0                    # image processor's max pixels per image (0: the model's own)
max_prompt_length = 1024          # a longer prompt is an error (images cannot be cut)
system_prompt = "default"         # vlm.SYSTEM_PROMPTS: the one the GRPO runs from this start use (train_grpo.py's)
answers = "reference"             # "reference": each record's answer | "random": a random option letter or count
                                  # 0-6 in choice and count records (the rationale stays true), left for RL to learn
# --- end config -------------------------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
# Settings added since cold_start.json was first written, at the value the versions before them used: a folder
# whose recipe lacks one was made that way.
ADDED_SETTINGS = {"train_vision": True, "answers": "reference", "vision_steps": 0, "domain_weights": "uniform"}


def reference_completion(solution, meta, rng=None):
    """The completion the cold start imitates: the record's rationale in <think>, its answer in <answer>. Given rng
    (answers="random"), a choice answer becomes a random option letter and a count a random number 0-6: the model
    still learns the format and to describe its picture, and GRPO has the answer left to learn (docs/testbed_log.md,
    item 11)."""
    answer = rewards.extract_answer(solution)
    answer = solution if answer is None else answer
    if rng is not None and meta.get("options"):
        answer = str(rng.choice(sorted(meta["options"])))
    elif rng is not None and answer.strip().isdigit():
        answer = str(rng.integers(0, 7))
    return f"<think>\n{meta.get('rationale', '')}\n</think>\n<answer>\n{answer.strip()}\n</answer>"


def recipe(config, manifest, domains):
    """What the result is a function of: every setting but where it is read from and written to, and the
    content fingerprint of each training split."""
    settings = {k: v for k, v in config.items() if k not in ("out_dir", "data_dir")}
    settings["data"] = {d: manifest["datasets"][d]["splits"]["train"]["fingerprint"] for d in domains}
    return settings


def existing_recipe(folder):
    """The recipe of the complete cold start in folder; None when there is none or an interrupted one (which may
    be replaced). Any other folder there is an error: nothing but a cold start is ever replaced."""
    info_path = os.path.join(folder, "cold_start.json")
    if not os.path.isdir(folder) or not os.listdir(folder):
        return None
    if not os.path.isfile(info_path):
        raise SystemExit(f"error: {folder} exists and is not a cold start (no cold_start.json); choose another "
                         "--out_dir")
    if vlm.checkpoint_problem(folder) is not None:
        return None
    with open(info_path) as f:
        return json.load(f)["settings"]


def overlap(box, cell):
    return max(0, min(box[2], cell[2]) - max(box[0], cell[0])) * max(0, min(box[3], cell[3]) - max(box[1], cell[1]))


def token_targets(objects, canvas, rows, cols):
    """Per image token (row-major over a rows x cols grid of the canvas): its row, its column, and the index in
    prepare_data's COLORS and SHAPES of the object that covers most of its cell (the last index: none, when no
    object covers 15 % of it). Boxes are [x1, y1, x2, y2] in pixels, x2 and y2 exclusive."""
    colors, shapes = list(prepare_data.COLORS), list(prepare_data.SHAPES)
    targets = []
    for r in range(rows):
        for c in range(cols):
            cell = (canvas * c / cols, canvas * r / rows, canvas * (c + 1) / cols, canvas * (r + 1) / rows)
            best = max(objects, key=lambda o: overlap(o["box"], cell), default=None)
            if best is None or overlap(best["box"], cell) < 0.15 * (canvas / cols) * (canvas / rows):
                targets.append((r, c, len(colors), len(shapes)))
            else:
                targets.append((r, c, colors.index(best["color"]), shapes.index(best["shape"])))
    return targets


def pretrain_vision(model, image_processor, canvas=112, batch=32):
    """vision_steps of AdamW on the tiny model's tower alone, through a linear read-out per image token of its
    row, its column and the colour and shape covering its cell, on scenes of 1-6 random objects drawn as
    prepare_data.py draws its suite (seeded here: none of the training records). A random tower says what a patch
    holds only weakly and not where it is, and the language model then never learns to read positions
    (docs/testbed_log.md, item 13). Returns the read-out's accuracy per target on the last step's scenes."""
    visual = model.model.visual
    visual.requires_grad_(True)
    grid = image_processor(images=[prepare_data.draw([], canvas)], return_tensors="pt")["image_grid_thw"][0]
    rows, cols = int(grid[1]) // image_processor.merge_size, int(grid[2]) // image_processor.merge_size
    sizes = [rows, cols, len(prepare_data.COLORS) + 1, len(prepare_data.SHAPES) + 1]
    readout = torch.nn.Linear(model.config.text_config.hidden_size, sum(sizes))
    params = list(visual.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / vision_steps)
    rng = random.Random(seed + 3)
    accuracy = {}
    for _ in tqdm(range(vision_steps), desc="vision pretraining", dynamic_ncols=True):
        scenes = [prepare_data.place(rng, prepare_data.random_specs(rng, rng.randint(1, 6)), canvas)
                  for _ in range(batch)]
        inputs = image_processor(images=[prepare_data.draw(objects, canvas) for objects in scenes],
                                 return_tensors="pt")
        targets = torch.tensor([t for objects in scenes for t in token_targets(objects, canvas, rows, cols)])
        tokens = torch.cat(model.model.get_image_features(inputs["pixel_values"],
                                                          inputs["image_grid_thw"]).pooler_output)
        logits = readout(tokens).split(sizes, dim=1)
        loss = sum(torch.nn.functional.cross_entropy(z, targets[:, k]) for k, z in enumerate(logits))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        accuracy = {name: round(float((z.argmax(1) == targets[:, k]).float().mean()), 3)
                    for k, (name, z) in enumerate(zip(("row", "column", "colour", "shape"), logits))}
    return accuracy


def train(datasets, model, tokenizer, image_processor):
    """steps of AdamW on the reference completions' negative log-likelihood; returns the last step's loss."""
    model.requires_grad_(True)
    if not train_vision:  # at lr 3e-3 a trained random tower collapses: every picture looks alike to the text
        model.model.visual.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    rng = np.random.default_rng(seed + 1)
    answer_rng = np.random.default_rng(seed + 2) if answers == "random" else None
    weights = resolve_mixture(domain_weights, "", sorted(datasets), "--domain_weights")
    domains, shares = list(weights), list(weights.values())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bar = tqdm(range(steps), desc="cold start", dynamic_ncols=True)
    for _ in bar:
        drawn = rng.choice(domains, batch_size) if domain_weights == "uniform" else \
            rng.choice(domains, batch_size, p=shares)  # uniform keeps the draws of cold starts made before weights
        picks = [(d, int(rng.integers(len(datasets[d])))) for d in drawn]
        problems, images, targets = [], [], []
        for d, row in picks:
            problem, image, solution, _, meta = record_fields(datasets[d][row])
            problems.append(problem)
            images.append(image)
            completion = reference_completion(solution, meta, answer_rng)
            targets.append(tokenizer.encode(completion, add_special_tokens=False) + [eos])
        prompts = vlm.encode_prompts(tokenizer, image_processor, problems, images, max_prompt_length,
                                     vlm.system_prompt_text(system_prompt))
        ids, mask = vlm.pad_completions(targets, tokenizer.pad_token_id, "cpu")
        logp = vlm.completion_logprobs(model, prompts, ids, mask, temperature=1.0)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def main(argv):
    config = read_settings(argv, DEFAULTS, __file__, __doc__)
    globals().update(config)  # from here on every setting is read by its plain name, as in nanoGPT
    try:
        vlm.system_prompt_text(system_prompt)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if answers not in ("reference", "random"):
        raise SystemExit(f"error: answers={answers!r}; use 'reference' or 'random'")
    if vision_steps and init_from not in vlm.TINY_FAMILIES:
        raise SystemExit(f"error: vision_steps={vision_steps} pretrains a tiny model's random vision tower; "
                         f"init_from={init_from} has a pretrained one: use --vision_steps=0")
    manifest = vlm.load_manifest(data_dir)
    domains = training_domains(manifest)
    resolve_mixture(domain_weights, "", domains, "--domain_weights")  # bad weights fail before minutes of work
    settings = recipe(config, manifest, domains)
    previous = existing_recipe(out_dir)
    if previous is not None:
        previous = {**ADDED_SETTINGS, **previous}  # a recipe from before a setting existed ran as it says
        changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
        if not changed:
            print(f"cold start: {out_dir} is up to date (same settings and data), nothing to do")
            return
        raise SystemExit(f"error: {out_dir} holds a cold start made with other {', '.join(changed)}; GRPO runs may "
                         "have started from it: delete it or choose another --out_dir")
    datasets = {d: load_train_split(data_dir, manifest, d) for d in domains}
    torch.manual_seed(seed)
    model, tokenizer, image_processor = vlm.load_policy(init_from, seed=seed, max_pixels=max_pixels)
    vision_readout = pretrain_vision(model, image_processor) if vision_steps else None
    final_loss = train(datasets, model, tokenizer, image_processor)
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.save_policy(model, tokenizer, image_processor, tmp)
    vlm.write_json_atomic(os.path.join(tmp, "cold_start.json"), {"settings": settings, "final_loss": final_loss,
                                                                      "vision_readout": vision_readout})
    vlm.write_checksums(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)  # an interrupted one, if any (existing_recipe)
    os.replace(tmp, out_dir)
    print(f"cold start: {steps} steps, final loss {final_loss:.3f}, saved {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
