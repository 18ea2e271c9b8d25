"""
GRPO on a mixture of vision-language datasets with verifiable rewards (MoDoMoDo, arXiv 2505.24871).

    python prepare_data.py && python train_grpo.py             # tiny Qwen2-VL, synthetic suite, CPU, minutes
    python train_grpo.py config/paper_qwen2vl_2b.json --mixture=out/predict/mixtures.json
    torchrun --nproc_per_node 7 train_grpo.py config/paper_qwen2vl_2b.json
    accelerate launch --config_file config/accelerate_zero3.yaml train_grpo.py config/paper_qwen2vl_2b.json
    python train_grpo.py --help                                # every setting, its default and meaning

What it keeps of GRPO (Shao et al. 2024, as the paper and TRL run it) and why:
- G completions per prompt, advantage = (r - group mean) / (group std + 1e-4): no value network, the group is
  the baseline. `scale_rewards=False` drops the std division (Dr. GRPO), which favours no difficulty level.
- Per-token clipped ratio with epsilon_low / epsilon_high (0.2 / 0.2): with num_iterations (mu) = 1 the ratio is
  exactly 1 and the clip never binds, so old log-probs are not computed at all; mu > 1 stores them.
- k3 KL to a frozen copy of the starting policy, beta = 0.04 (paper); beta = 0 loads no reference.
- Loss aggregated per token over the micro-batch (paper); per-sequence mean and Dr. GRPO's constant normaliser
  are options.
What it drops: no value model, no entropy bonus, no reward model (every reward is a program, rewards.py).

Data: prepare_data.py's records; the mixture {domain: weight} picks a domain with probability w, then an unseen
example of it. `interleave_under` ends training when the picked domain is exhausted (paper); `with_replacement`
reshuffles it. The whole sampling schedule is a function of (seed, mixture, dataset sizes), so resuming at step k
replays exactly the data an uninterrupted run would have seen.

Outputs in out_dir: config.json, metrics.jsonl (one line per step), samples.jsonl, ckpt-NNNNNN/ folders
(save_pretrained weights that plain transformers loads + trainer/ with optimizer, scheduler and RNG states,
checksums.json written last: a folder without a valid one is incomplete and is never loaded).
"""
import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time

# Idle OpenMP threads that spin instead of sleeping make torch 10-20x slower when another program uses a core
# (measured: GRPO 9-17 s/step instead of 0.6 s); set before torch loads, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from tqdm import tqdm

import rewards
import vlm

# --- config -----------------------------------------------------------------------------------------------
# Defaults are the embedded CPU run (tiny model, synthetic suite); every GRPO setting that does not depend on
# scale is the paper's. Where the CPU run differs from the paper the comment says "paper: ...".
# Override: python train_grpo.py [config.json ...] [--key=value ...]
# I/O
out_dir = "out/grpo"              # checkpoints, metrics.jsonl, samples.jsonl, config.json
data_dir = "data"                 # prepare_data.py output: manifest.json + one folder per domain/split
resume = False                    # continue from the last complete checkpoint in out_dir
seed = 0
# model
init_from = "tiny"                # "tiny", a hub name (Qwen/Qwen2-VL-2B-Instruct) or a save_pretrained folder
freeze_vision = True              # the vision tower is not trained (paper)
max_pixels = 0                    # image processor's max pixels per image (0: the model's own)
# supervised cold start: a random tiny model earns no reward, so it first imitates the reference answers
cold_start_steps = 300            # 0: none (paper: none, Qwen2-VL-Instruct already follows the format)
cold_start_dir = "out/cold_start" # cached result, reused by every run with the same cold-start settings
cold_start_batch = 16
cold_start_lr = 3e-3
# data mixture
mixture = "uniform"               # "uniform", '{"syn_count": 2, "syn_ground": 1}', a {domain: w} JSON file,
                                  # or predict_mixture.py's mixtures.json
mixture_proposal = ""             # which proposal of a mixtures.json (default: its first)
sampling = "interleave_under"     # "interleave_under": stop when a domain is exhausted (paper) | "with_replacement"
max_steps = 150                   # GRPO steps; 0: until a domain is exhausted (interleave_under only)
# GRPO
prompts_per_step = 4              # prompts per step over all processes (paper: 2)
num_generations = 6               # G, completions per prompt (paper: 6); a step's prompts x G completions are
                                  # split evenly over the processes, so a group may span processes (as in TRL)
micro_batch_size = 0              # completions per forward/backward (0: all of a process's); gradients accumulate
temperature = 1.0
max_prompt_length = 1024          # a longer prompt is an error naming the record (images cannot be cut)
max_completion_length = 64        # paper: 1024
ignore_eos = False                # benchmarks: always generate max_completion_length tokens
epsilon_low = 0.2
epsilon_high = 0.2
beta = 0.04                       # k3 KL coefficient; 0 loads no reference model
scale_rewards = True              # divide advantages by the group std (False: Dr. GRPO)
loss_type = "token"               # "token": mean over the micro-batch's tokens (paper) | "sequence" | "dr_grpo"
num_iterations = 1                # mu: optimizer updates per batch of rollouts
reward_gate_on_format = True      # a failed format zeroes every reward (paper); False: the official code
reward_format_mode = "strict"     # "strict" (official regex) | "lenient"
# optimizer: AdamW, linear warm-up then linear decay
learning_rate = 3e-4              # paper: 1e-6
weight_decay = 0.0
warmup_ratio = 0.1
grad_clip = 1.0
# rollouts
rollout_engine = "hf"             # "hf": generate in the trainer | "vllm": a vLLM server (see the README)
vllm_url = "http://127.0.0.1:8000"
vllm_timeout = 300.0              # seconds one server call may take; then the run stops with an error, never hangs
vllm_retries = 3                  # retries of refused or dropped connections and 5xx answers
vllm_sync_every = 1               # steps between weight syncs to the server (1: on-policy, as the paper)
vllm_sync_dir = ""                # synced weights go here, readable by the server (default: out_dir/vllm_weights)
vllm_logprobs = False             # diagnostic: log the mean |trainer - vLLM| log-prob of the sampled tokens
# logging and checkpoints
log_samples_every = 20            # write a few completions to samples.jsonl every N steps
checkpoint_every = 50             # and at the end
# --- end config -------------------------------------------------------------------------------------------

CONFIG_KEYS = [k for k, v in dict(globals()).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str)) and k != "CONFIG_KEYS"]


def print_help():
    src = open(__file__).read()
    block = src[src.index("# --- config"):src.index("# --- end config")]
    print(__doc__.strip().split("\n\n")[0], "\n\nSettings (defaults):\n")
    print("\n".join(block.splitlines()[1:]))


def parse_value(text):
    """'3' -> 3, 'true' -> True, '{"a": 1}' -> dict, 'out/x' -> 'out/x'."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_config(config, key, value, where):
    if key not in config:
        raise SystemExit(f"error: unknown setting '{key}' ({where}); see python train_grpo.py --help")
    default = config[key]
    if isinstance(value, dict) and isinstance(default, str):
        value = json.dumps(value)  # a mixture given inline in a JSON config file
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise SystemExit(f"error: setting '{key}' ({where}) must be {type(default).__name__}, got {value!r}")
    config[key] = value


def parse_config(argv):
    """Defaults above, then JSON config files, then --key=value, in the order given."""
    config = {k: globals()[k] for k in CONFIG_KEYS}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help()
            sys.exit(0)
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            set_config(config, key, parse_value(text) if has_value else True, arg)
        else:
            try:
                with open(arg) as f:
                    overrides = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e}")
            for key, value in overrides.items():
                if not key.startswith("_"):  # "_comment" and the like document a config file
                    set_config(config, key, value, arg)
    for key, allowed in [("sampling", ("interleave_under", "with_replacement")),
                         ("loss_type", ("token", "sequence", "dr_grpo")),
                         ("reward_format_mode", ("strict", "lenient"))]:
        if config[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {allowed}, got {config[key]!r}")
    if config["sampling"] == "with_replacement" and config["max_steps"] <= 0:
        raise SystemExit("error: sampling=with_replacement never runs out of data: set max_steps > 0")
    if config["rollout_engine"] not in ("hf", "vllm"):
        raise SystemExit(f"error: rollout_engine must be 'hf' or 'vllm', got {config['rollout_engine']!r}")
    if config["vllm_logprobs"] and config["temperature"] != 1.0:
        raise SystemExit("error: vllm_logprobs compares raw log-probs, so it needs temperature = 1")
    if config["num_generations"] < 2:
        raise SystemExit("error: num_generations must be >= 2 (the group is the baseline)")
    return config


# ----------------------------------------------------------------------------------------------------------
# data: manifest, mixture, sampling schedule

def load_train_split(data_dir, manifest, domain):
    from datasets import load_from_disk
    return load_from_disk(os.path.join(data_dir, manifest["datasets"][domain]["splits"]["train"]["path"]))


def training_domains(manifest):
    return sorted(d for d, info in manifest["datasets"].items() if "train" in info["splits"])


def resolve_mixture(spec, proposal, domains):
    """{domain: weight} normalised to sum 1, from "uniform", inline JSON, a JSON file or a mixtures.json."""
    if spec == "uniform":
        raw = {d: 1.0 for d in domains}
    else:
        if spec.lstrip().startswith("{"):
            raw, where = json.loads(spec), "--mixture"
        else:
            try:
                with open(spec) as f:
                    raw, where = json.load(f), spec
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: cannot read mixture file {spec}: {e}")
        if "proposals" in raw:  # predict_mixture.py output
            proposals = raw["proposals"]
            chosen = [p for p in proposals if p.get("name") == proposal] if proposal else proposals[:1]
            if not chosen:
                names = [p.get("name") for p in proposals]
                raise SystemExit(f"error: no proposal named {proposal!r} in {spec}; it has {names}")
            raw = chosen[0]["mixture"]
        elif "mixture" in raw and isinstance(raw["mixture"], dict):  # a run's config.json
            raw = raw["mixture"]
        unknown = sorted(set(raw) - set(domains))
        if unknown:
            raise SystemExit(f"error: mixture ({where}) names unknown domain(s) {unknown}; "
                             f"the manifest's training domains are {domains}")
    for d, w in raw.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise SystemExit(f"error: mixture weight for {d!r} must be a finite number >= 0, got {w!r}")
    total = sum(raw.values())
    if total <= 0:
        raise SystemExit("error: mixture weights are all zero")
    return {d: raw[d] / total for d in sorted(raw) if raw[d] > 0}


def build_schedule(weights, sizes, prompts_per_step, max_steps, sampling, seed):
    """The (domain, row) of every prompt of every step, fixed by the seed.

    Each prompt picks a domain with probability w, then that domain's next unseen row (a seeded permutation).
    interleave_under: the first pick of an exhausted domain ends training before that step (the paper).
    with_replacement: an exhausted domain is reshuffled.
    """
    rng = np.random.default_rng(seed)
    domains = sorted(weights)
    p = np.array([weights[d] for d in domains])
    order = {d: rng.permutation(sizes[d]) for d in domains}
    position = {d: 0 for d in domains}
    schedule = []
    while max_steps <= 0 or len(schedule) < max_steps:
        step = []
        for d in rng.choice(domains, size=prompts_per_step, p=p):
            d = str(d)
            if position[d] == sizes[d]:
                if sampling == "interleave_under":
                    return schedule
                order[d], position[d] = rng.permutation(sizes[d]), 0
            step.append((d, int(order[d][position[d]])))
            position[d] += 1
        schedule.append(step)
    return schedule


def local_slots(prompts_per_step, num_generations, rank, world):
    """The (prompt, generation) pairs this process owns: the step's prompts x G completions split evenly, in
    order, so gathering per-process results in rank order restores whole groups."""
    slots = [(p, g) for p in range(prompts_per_step) for g in range(num_generations)]
    per = len(slots) // world
    return slots[rank * per:(rank + 1) * per]


def record_fields(record):
    meta = json.loads(record["meta"]) if record.get("meta") else {}
    return record["problem"], record["image"], record["solution"], record["domain"], meta


# ----------------------------------------------------------------------------------------------------------
# the GRPO objective (pure functions, tested against hand-computed values)

def group_advantages(group_rewards, scale=True):
    """(r - mean) / (std + 1e-4) within each group of G; rows of the input are groups. std is unbiased (TRL)."""
    mean = group_rewards.mean(dim=1, keepdim=True)
    advantages = group_rewards - mean
    if scale:
        advantages = advantages / (group_rewards.std(dim=1, keepdim=True) + 1e-4)
    return advantages


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, epsilon_low, epsilon_high, beta, loss_type,
              max_completion_length):
    """Clipped policy-gradient loss with a k3 KL penalty. logp/old_logp/ref_logp/mask: (B, T); advantages: (B,).

    Returns (loss, stats) with stats = per-token mean KL and clip fraction over the unmasked tokens.
    """
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * a
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta != 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    if loss_type == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "sequence":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:  # dr_grpo: a constant normaliser, so long and short completions weigh per token alike
        loss = (per_token * mask).sum() / (mask.shape[0] * max_completion_length)
    is_clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    n_tokens = mask.sum().clamp(min=1)
    stats = {"kl": ((kl * mask).sum() / n_tokens).item(),
             "clip_fraction": ((is_clipped.to(mask.dtype) * mask).sum() / n_tokens).item()}
    return loss, stats


def selective_log_softmax(logits, ids):
    """log softmax(logits)[ids] row by row, never materialising the full (B, T, V) log-probabilities."""
    out = []
    for row_logits, row_ids in zip(logits, ids):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def completion_logprobs(model, prompts, completion_ids, completion_mask, temperature, prompt_of_row=None):
    """Per-token log-probs of the completions given their prompts. prompts: left-padded, one row per distinct
    prompt; prompt_of_row[i]: the prompt row of completion i (default: row i).

    Each prompt (and its image) goes through the model once; its KV cache is copied to its completions, which
    then run on top of it. The G completions of a prompt share its positions and attention states, so this is
    the same computation as running prompt + completion G times, and the gradient through the copies is the
    sum the G runs would give, at a fraction of the tokens (a prompt is longer than a completion here).
    """
    from accelerate.utils import extract_model_from_parallel
    if prompt_of_row is None:
        prompt_of_row = torch.arange(len(completion_ids), device=completion_ids.device)
    positions = vlm.prompt_position_ids(extract_model_from_parallel(model), prompts)  # DDP hides .model
    out = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)
    logits = out.logits[prompt_of_row]  # the last prompt position predicts the first completion token
    n = completion_ids.shape[1]
    if n > 1:  # the other completion tokens, on top of the prompt's cache; the last one predicts nothing needed
        cache = out.past_key_values
        cache.reorder_cache(prompt_of_row)
        attention_mask = torch.cat([prompts["attention_mask"][prompt_of_row], completion_mask[:, :-1]], dim=1)
        steps = torch.arange(1, n, device=positions.device)
        out = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask, past_key_values=cache,
                    position_ids=positions[:, prompt_of_row, -1:] + steps, use_cache=True)
        logits = torch.cat([logits, out.logits], dim=1)
    return selective_log_softmax(logits / temperature, completion_ids)


def pad_completions(completions, pad_id, device):
    """Right-padded (B, T) ids and mask; T = the longest completion (>= 1)."""
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), length), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary folder, checksummed (vlm.write_checksums), then renamed; a folder without
# valid checksums is incomplete (killed mid-write) or corrupt, and is reported, never loaded.

def find_checkpoints(out_dir):
    """(step, folder) of every ckpt-NNNNNN folder, newest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        if name.startswith("ckpt-") and name[5:].isdigit():
            found.append((int(name[5:]), os.path.join(out_dir, name)))
    return sorted(found, reverse=True)


def last_good_checkpoint(out_dir, log):
    for step, folder in find_checkpoints(out_dir):
        problem = vlm.checkpoint_problem(folder)
        if problem is None:
            return step, folder
        log(f"skipping checkpoint {folder}: {problem}")
    return None, None


def save_checkpoint(accelerator, model, tokenizer, image_processor, out_dir, step, state):
    """Weights as a save_pretrained folder, optimizer/scheduler/RNG of every process under trainer/."""
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(tmp, "trainer"))  # every process writes its RNG state
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; a collective
    if accelerator.is_main_process:
        vlm.save_policy(accelerator.unwrap_model(model), tokenizer, image_processor, tmp, state_dict=state_dict)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        vlm.write_checksums(tmp)
        if os.path.isdir(final):  # re-saving a step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def skip_model_weights_in_trainer_state(accelerator):
    """accelerate's save_state/load_state would store the weights a second time; save_pretrained has them."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


# ----------------------------------------------------------------------------------------------------------
# supervised cold start (the tiny model only needs it; real Instruct models already follow the format)

def reference_completion(solution, meta):
    answer = rewards.extract_answer(solution)
    answer = solution if answer is None else answer
    return f"<think>\n{meta.get('rationale', '')}\n</think>\n<answer>\n{answer.strip()}\n</answer>"


def cold_start(config, manifest, datasets, accelerator, log):
    """Supervised steps on the reference answers of every training domain (uniformly, so the base does not
    depend on the mixture under study). Cached in cold_start_dir and reused when the settings match."""
    key_fields = {k: config[k] for k in ("init_from", "cold_start_steps", "cold_start_batch", "cold_start_lr",
                                         "seed", "max_pixels", "max_prompt_length")}
    key_fields["data"] = {d: manifest["datasets"][d]["splits"]["train"]["fingerprint"] for d in sorted(datasets)}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    folder = config["cold_start_dir"]
    info_path = os.path.join(folder, "cold_start.json")
    if vlm.checkpoint_problem(folder) is None and os.path.isfile(info_path):
        with open(info_path) as f:
            if json.load(f).get("key") == key:
                log(f"cold start: reusing {folder}")
                return folder
    if accelerator.is_main_process:
        _run_cold_start(config, datasets, folder, key, key_fields, log)
    accelerator.wait_for_everyone()
    return folder


def _run_cold_start(config, datasets, folder, key, key_fields, log):
    torch.manual_seed(config["seed"])
    model, tokenizer, image_processor = load_model(config)
    model.requires_grad_(True)  # the vision tower too: a randomly initialised one must learn to see
    model.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config["cold_start_lr"], weight_decay=0.0)
    steps = config["cold_start_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    rng = np.random.default_rng(config["seed"] + 1)
    domains = sorted(datasets)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bar = tqdm(range(steps), desc="cold start", dynamic_ncols=True)
    for _ in bar:
        picks = [(d, int(rng.integers(len(datasets[d])))) for d in rng.choice(domains, config["cold_start_batch"])]
        problems, images, targets = [], [], []
        for d, row in picks:
            problem, image, solution, _, meta = record_fields(datasets[d][row])
            problems.append(problem)
            images.append(image)
            targets.append(tokenizer.encode(reference_completion(solution, meta), add_special_tokens=False) + [eos])
        prompts = vlm.encode_prompts(tokenizer, image_processor, problems, images, config["max_prompt_length"])
        ids, mask = pad_completions(targets, tokenizer.pad_token_id, "cpu")
        logp = completion_logprobs(model, prompts, ids, mask, temperature=1.0)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.save_policy(model, tokenizer, image_processor, tmp)
    with open(os.path.join(tmp, "cold_start.json"), "w") as f:
        json.dump({"key": key, "settings": key_fields, "final_loss": loss.item()}, f, indent=1)
    vlm.write_checksums(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log(f"cold start: {steps} steps, final loss {loss.item():.3f}, saved {folder}")


# ----------------------------------------------------------------------------------------------------------
# model, rollouts

def load_model(config, path=None):
    model, tokenizer, image_processor = vlm.load_policy(path or config["init_from"], seed=config["seed"])
    if config["max_pixels"]:
        image_processor.size["longest_edge"] = config["max_pixels"]
    if config["freeze_vision"]:
        model.model.visual.requires_grad_(False)
    return model, tokenizer, image_processor


@contextlib.contextmanager
def full_weights(accelerator, model):
    """The unwrapped model with every parameter present, for HF generate under ZeRO-3 or FSDP."""
    from accelerate.utils import DistributedType
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield unwrapped
    else:
        yield unwrapped


def distinct_prompts(tokenizer, image_processor, records, slots, max_prompt_length=None):
    """Model inputs of each distinct prompt among the slots (in order), and the row of each slot's prompt in them.
    Slots are grouped by prompt, so a prompt's G completions share one encoding of it (and of its image)."""
    order = list(dict.fromkeys(p for p, _ in slots))
    batch = vlm.encode_prompts(tokenizer, image_processor, [records[p][0] for p in order],
                               [records[p][1] for p in order], max_prompt_length)
    return batch, torch.tensor([order.index(p) for p, _ in slots])


def rollout_hf(accelerator, model, tokenizer, image_processor, records, slots, config):
    """One completion per slot; generation encodes each distinct prompt once for all its completions."""
    prompts, prompt_of_slot = distinct_prompts(tokenizer, image_processor, records, slots,
                                               config["max_prompt_length"])
    with full_weights(accelerator, model) as policy:
        return vlm.generate(policy, tokenizer, prompts, n=prompt_of_slot.bincount().tolist(),
                            max_new_tokens=config["max_completion_length"], temperature=config["temperature"],
                            min_new_tokens=config["max_completion_length"] if config["ignore_eos"] else 0)


def rollout_vllm(accelerator, client, tokenizer, image_processor, records, slots, config):
    """The main process asks the server for the step's prompts x G completions (n = G per prompt) and shares
    them; each process keeps its slots. A server failure is shared too, so no process waits for the others.
    Returns (completions, vLLM log-probs or None) for this process's slots."""
    from accelerate.utils import broadcast_object_list
    result = [None, None, None]  # completions, logprobs, error
    if accelerator.is_main_process:
        try:
            problems, images = [r[0] for r in records], [r[1] for r in records]
            prompt_ids = vlm.encode_prompts(tokenizer, image_processor, problems, images,
                                            config["max_prompt_length"])
            unpadded = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids["input_ids"],
                                                                       prompt_ids["attention_mask"])]
            out = client.generate(problems, images, n=config["num_generations"],
                                  max_new_tokens=config["max_completion_length"], temperature=config["temperature"],
                                  prompt_ids=unpadded, suppress_token_ids=vlm.vision_token_ids(tokenizer),
                                  ignore_eos=config["ignore_eos"], logprobs=config["vllm_logprobs"])
            result[:2] = out if config["vllm_logprobs"] else (out, None)
        except Exception as e:  # vlm.VLLMServerError above all; shared so every process stops
            result[2] = f"{type(e).__name__}: {e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    completions, logprobs, error = result
    if error:
        raise TrainingStopped(f"vLLM rollout failed: {error}; the last checkpoint is kept")
    G = config["num_generations"]
    mine = [p * G + g for p, g in slots]
    return [completions[i] for i in mine], (None if logprobs is None else [logprobs[i] for i in mine])


def sync_vllm_weights(accelerator, model, client, sync_dir):
    """Gather the policy (ZeRO-3 / FSDP shards too), write it atomically, have the server reload it; returns
    the seconds it took. Every process takes part in the gather; only the main one talks to the server."""
    from accelerate.utils import broadcast_object_list
    t0 = time.perf_counter()
    state_dict = accelerator.get_state_dict(model)
    result = [None]
    if accelerator.is_main_process:
        try:
            vlm.write_weights(state_dict, sync_dir)
            client.reload_weights(sync_dir)
        except Exception as e:
            result[0] = f"{type(e).__name__}: {e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    if result[0]:
        raise TrainingStopped(f"weight sync to the vLLM server failed: {result[0]}; the last checkpoint is kept")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# the loop

class TrainingStopped(RuntimeError):
    pass


def stop_if_any_failed(accelerator, error):
    """Every process learns that one failed, so none waits forever in the next collective."""
    from accelerate.utils import gather_object
    errors = [e for e in gather_object([error]) if e] if accelerator.num_processes > 1 else [e for e in [error] if e]
    if errors:
        raise TrainingStopped(errors[0])


def lr_lambda(warmup, total):
    def factor(update):
        if update < warmup:
            return (update + 1) / warmup
        return max(0.0, (total - update) / max(1, total - warmup))
    return factor


def score_completions(texts, records, config):
    """rewards.score of each completion against the record it answers."""
    options = dict(gate_on_format=config["reward_gate_on_format"], format_mode=config["reward_format_mode"])
    return [rewards.score(text, solution, domain, meta, **options)
            for text, (_, _, solution, domain, meta) in zip(texts, records)]


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def step_metrics(all_scores, all_domains, all_lengths):
    m = {"reward": mean(s["total"] for s in all_scores),
         "completion_length": mean(all_lengths)}
    for d in sorted(set(all_domains)):
        m[f"reward/{d}"] = mean(s["total"] for s, dd in zip(all_scores, all_domains) if dd == d)
    for name in sorted({k for s in all_scores for k in s if k != "total"}):
        m[f"reward_fn/{name}"] = mean(s[name] for s in all_scores if name in s)
    return m


def truncate_jsonl(path, last_step):
    """Drop lines of steps after last_step (a resumed run rewrites them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def plot_metrics(metrics_path, png_path, window=20):
    """metrics.png: reward (overall and per domain), loss, KL and completion length over the steps, each as a
    moving average over `window` steps, since one step's mean over a few prompts is noisy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    if not rows:
        return

    def smooth(key):
        steps = [r["step"] for r in rows if key in r]
        values = np.array([r[key] for r in rows if key in r], dtype=float)
        kernel = np.ones(min(window, len(values))) / min(window, len(values))
        return steps[len(kernel) - 1:], np.convolve(values, kernel, mode="valid")

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for key in ["reward"] + sorted({k for r in rows for k in r if k.startswith("reward/")}):
        axes[0].plot(*smooth(key), label=key, linewidth=2.5 if key == "reward" else 1)
    axes[0].legend(fontsize=7)
    for ax, key in zip(axes[1:], ["loss", "kl", "completion_length"]):
        ax.plot(*smooth(key))
        ax.set_title(key)
    axes[0].set_title(f"reward (total, per domain), {window}-step moving average")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def main(argv):
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed

    config = parse_config(argv)
    cuda = torch.cuda.is_available()
    # bf16 autocast over fp32 master weights on GPU: a bf16 weight cannot absorb a 1e-6 update.
    # step_scheduler_with_optimizer=False: our schedule counts optimizer updates, not per-process batches.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                              step_scheduler_with_optimizer=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    log = accelerator.print

    # data and schedule
    manifest = vlm.load_manifest(config["data_dir"])
    domains = training_domains(manifest)
    weights = resolve_mixture(config["mixture"], config["mixture_proposal"], domains)
    datasets = {d: load_train_split(config["data_dir"], manifest, d) for d in weights}
    G = config["num_generations"]
    n_completions = config["prompts_per_step"] * G
    if n_completions % world or (config["micro_batch_size"] and (n_completions // world) % config["micro_batch_size"]):
        raise SystemExit(f"error: a step's {n_completions} completions (prompts_per_step x num_generations) must "
                         f"split evenly over {world} process(es) into micro-batches of micro_batch_size="
                         f"{config['micro_batch_size']}")
    schedule = build_schedule(weights, {d: len(ds) for d, ds in datasets.items()}, config["prompts_per_step"],
                              config["max_steps"], config["sampling"], config["seed"])
    total_steps = len(schedule)
    if total_steps == 0:
        raise SystemExit("error: the mixture exhausts a domain before the first step")
    slots = local_slots(config["prompts_per_step"], G, rank, world)

    # model: the cold-start checkpoint (cached) or init_from
    start_path = None
    if config["cold_start_steps"] > 0:
        cold_datasets = {d: load_train_split(config["data_dir"], manifest, d) for d in domains}
        start_path = cold_start(config, manifest, cold_datasets, accelerator, log)
    model, tokenizer, image_processor = load_model(config, start_path)
    ref_model = None
    if config["beta"] != 0:
        ref_model = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    total_updates = total_steps * config["num_iterations"]
    warmup = max(1, int(config["warmup_ratio"] * total_updates))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_updates))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    skip_model_weights_in_trainer_state(accelerator)

    # Seeded after the cold start, so sampling is the same whether it ran now or was reused; a resume then
    # restores every process's RNG state as it was at the checkpoint.
    set_seed(config["seed"] + rank)

    # resume
    out_dir = config["out_dir"]
    start_step = 0
    metrics_path, samples_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "samples.jsonl")
    run_info = {"config": config, "mixture_weights": weights, "planned_steps": total_steps, "processes": world,
                "start_from": start_path or config["init_from"]}
    if config["resume"]:
        step, folder = last_good_checkpoint(out_dir, log)
        if folder is None:
            raise SystemExit(f"error: --resume but no complete checkpoint in {out_dir}")
        with open(os.path.join(folder, "trainer_state.json")) as f:
            saved = json.load(f)
        if saved["mixture_weights"] != weights or saved["planned_steps"] != total_steps:
            raise SystemExit(f"error: {folder} was written by a run with another mixture or schedule; "
                             "resume with the same settings or start a new out_dir")
        vlm.load_weights(accelerator.unwrap_model(model), folder)
        accelerator.load_state(os.path.join(folder, "trainer"))  # optimizer, scheduler, every process's RNG
        start_step = step
        log(f"resumed from {folder} at step {step}")
        if accelerator.is_main_process:
            truncate_jsonl(metrics_path, step)
            truncate_jsonl(samples_path, step)
    elif accelerator.is_main_process and find_checkpoints(out_dir):
        raise SystemExit(f"error: {out_dir} already has checkpoints: pass --resume or choose another out_dir")
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(run_info, f, indent=1)
    accelerator.wait_for_everyone()

    client, sync_dir = None, config["vllm_sync_dir"] or os.path.join(out_dir, "vllm_weights")
    if config["rollout_engine"] == "vllm":
        error = None
        if accelerator.is_main_process:
            client = vlm.VLLMClient(config["vllm_url"], image_processor, timeout=config["vllm_timeout"],
                                    retries=config["vllm_retries"])
            try:
                served = client.check_health(weight_sync=True)
                log(f"vLLM server at {config['vllm_url']} serves {served['id']}")
            except vlm.VLLMServerError as e:
                error = str(e)
        stop_if_any_failed(accelerator, error)
        # The server starts from whatever folder it was given; the policy may be a cold start or a resume.
        log(f"weights synced to the vLLM server in {sync_vllm_weights(accelerator, model, client, sync_dir):.2f} s")

    model.train()
    pad_id = tokenizer.pad_token_id
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="grpo",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        picks = schedule[step]
        ids = [datasets[d][row]["id"] for d, row in picks]
        records = [record_fields(datasets[d][row]) for d, row in picks]
        mine = [records[p] for p, _ in slots]  # the prompt of each completion this process owns

        # 1. rollouts: one completion per owned slot
        t0 = time.perf_counter()
        server_logprobs = None
        if config["rollout_engine"] == "vllm":
            completions, server_logprobs = rollout_vllm(accelerator, client, tokenizer, image_processor, records,
                                                        slots, config)
        else:
            error = None
            try:
                completions = rollout_hf(accelerator, model, tokenizer, image_processor, records, slots, config)
            except Exception as e:  # reported on every process, so none waits in a collective for this one
                error = f"step {step + 1}, records {ids}: {type(e).__name__}: {e}"
            stop_if_any_failed(accelerator, error)
        t_generate = time.perf_counter() - t0

        # 2. rewards here, advantages over whole groups (gathered from every process)
        t0 = time.perf_counter()
        texts = [vlm.decode(tokenizer, c) for c in completions]
        scores = score_completions(texts, mine, config)
        bad = [i for i, s in enumerate(scores) if not all(math.isfinite(v) for v in s.values())]
        stop_if_any_failed(accelerator, f"non-finite reward at step {step + 1} for record {ids[slots[bad[0]][0]]}:"
                                        f" {scores[bad[0]]}" if bad else None)
        totals = accelerator.gather(torch.tensor([s["total"] for s in scores], device=accelerator.device)).cpu()
        advantages = group_advantages(totals.view(-1, G), config["scale_rewards"]).view(-1)
        advantages = advantages[rank * len(slots):(rank + 1) * len(slots)]
        t_reward = time.perf_counter() - t0

        # 3. policy update(s): num_iterations optimizer updates over the same rollouts
        lr = scheduler.get_last_lr()[0]  # the rate this step's (first) update uses
        t_ref_old = t_fwd_bwd = t_opt = 0.0
        size = config["micro_batch_size"] or len(slots)
        micro_batches = [list(range(i, i + size)) for i in range(0, len(slots), size)]
        cached = {}  # micro-batch index -> (prompts, prompt_of_row, ids, mask, ref_logp, old_logp)
        losses, kls, clips, grad_norms, server_diffs = [], [], [], [], []
        for iteration in range(config["num_iterations"]):
            for k, mb in enumerate(micro_batches):
                if k not in cached:
                    t0 = time.perf_counter()
                    mb_prompts, prompt_of_row = distinct_prompts(tokenizer, image_processor, records,
                                                                 [slots[i] for i in mb])
                    mb_prompts = {n: v.to(accelerator.device) for n, v in mb_prompts.items()}
                    prompt_of_row = prompt_of_row.to(accelerator.device)
                    c_ids, c_mask = pad_completions([completions[i] for i in mb], pad_id, accelerator.device)
                    with torch.no_grad(), accelerator.autocast():
                        ref_logp = completion_logprobs(ref_model, mb_prompts, c_ids, c_mask, config["temperature"],
                                                       prompt_of_row) if ref_model is not None else None
                        old_logp = completion_logprobs(model, mb_prompts, c_ids, c_mask, config["temperature"],
                                                       prompt_of_row) if config["num_iterations"] > 1 else None
                    cached[k] = (mb_prompts, prompt_of_row, c_ids, c_mask, ref_logp, old_logp)
                    t_ref_old += time.perf_counter() - t0
                mb_prompts, prompt_of_row, c_ids, c_mask, ref_logp, old_logp = cached[k]
                t0 = time.perf_counter()
                last = k == len(micro_batches) - 1
                with (contextlib.nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                    logp = completion_logprobs(model, mb_prompts, c_ids, c_mask, config["temperature"],
                                               prompt_of_row)
                    loss, stats = grpo_loss(
                        logp, old_logp if old_logp is not None else logp.detach(),
                        ref_logp if ref_logp is not None else logp.detach(),
                        advantages[mb].to(logp.device), c_mask, config["epsilon_low"], config["epsilon_high"],
                        config["beta"], config["loss_type"], config["max_completion_length"])
                    accelerator.backward(loss / len(micro_batches))
                if server_logprobs is not None and iteration == 0:  # the weights that generated them
                    served = torch.zeros_like(logp)  # not pad_completions: its integer tensor truncates them
                    for row, i in enumerate(mb):
                        served[row, :len(server_logprobs[i])] = torch.tensor(server_logprobs[i])
                    diff = ((logp.detach() - served).abs() * c_mask).sum() / c_mask.sum()
                    server_diffs.append(diff.item())
                losses.append(loss.item())
                kls.append(stats["kl"])
                clips.append(stats["clip_fraction"])
                t_fwd_bwd += time.perf_counter() - t0
            t0 = time.perf_counter()
            grad_norm = float(accelerator.clip_grad_norm_(params, config["grad_clip"]))
            grad_norms.append(grad_norm)
            if not math.isfinite(grad_norm) or not all(math.isfinite(x) for x in losses):
                # gradients are all-reduced, so every process sees the same non-finite norm and stops here
                raise TrainingStopped(f"non-finite loss or gradient at step {step + 1} (loss {losses}, grad norm "
                                      f"{grad_norm}); the last good checkpoint is kept")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not all(torch.isfinite(p).all() for p in params):
                raise TrainingStopped(f"non-finite weights after the update of step {step + 1}; the last good "
                                      "checkpoint is kept")
            t_opt += time.perf_counter() - t0

        t_sync = 0.0
        if config["rollout_engine"] == "vllm" and ((step + 1) % config["vllm_sync_every"] == 0) \
                and step + 1 < total_steps:
            t_sync = sync_vllm_weights(accelerator, model, client, sync_dir)

        # 4. metrics, samples, checkpoint
        lengths = [len(c) for c in completions]
        mine_stats = (scores, [r[3] for r in mine], lengths, mean(losses), mean(kls), mean(clips), server_diffs)
        gathered = gather_object([mine_stats]) if world > 1 else [mine_stats]
        t_total = time.perf_counter() - t_step
        if accelerator.is_main_process:
            all_scores = [s for g in gathered for s in g[0]]
            all_domains = [d for g in gathered for d in g[1]]
            all_lengths = [n for g in gathered for n in g[2]]
            metrics = {"step": step + 1, "loss": mean(g[3] for g in gathered), "kl": mean(g[4] for g in gathered),
                       "clip_fraction": mean(g[5] for g in gathered), "grad_norm": mean(grad_norms),
                       "lr": lr, **step_metrics(all_scores, all_domains, all_lengths),
                       "samples_per_s": len(all_scores) / t_total, "tokens_per_s": sum(all_lengths) / t_total,
                       "t_generate": t_generate, "t_reward": t_reward, "t_ref_old": t_ref_old,
                       "t_forward_backward": t_fwd_bwd, "t_optimizer": t_opt, "t_sync": t_sync, "t_step": t_total}
            if config["vllm_logprobs"]:
                metrics["vllm_logprob_abs_diff"] = mean(d for g in gathered for d in g[6])
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if config["log_samples_every"] and (step + 1) % config["log_samples_every"] == 0:
                p = slots[0][0]
                problem, _, solution, domain, _ = records[p]
                sample = {"step": step + 1, "id": ids[p], "domain": domain, "problem": problem, "solution": solution,
                          "completions": [{"text": t, "reward": s} for t, s, (q, _) in zip(texts, scores, slots)
                                          if q == p]}
                with open(samples_path, "a") as f:
                    f.write(json.dumps(sample) + "\n")
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", s_per_step=f"{t_total:.2f}")
        if (step + 1) % config["checkpoint_every"] == 0 or step + 1 == total_steps:
            save_checkpoint(accelerator, model, tokenizer, image_processor, out_dir, step + 1,
                            {"step": step + 1, "mixture_weights": weights, "planned_steps": total_steps,
                             "config": config})
    if accelerator.is_main_process:
        plot_metrics(metrics_path, os.path.join(out_dir, "metrics.png"))
    log(f"done: {total_steps} steps, checkpoints in {out_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
