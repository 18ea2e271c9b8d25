"""
GRPO on a mixture of vision-language datasets with verifiable rewards (MoDoMoDo, arXiv 2505.24871).

    python prepare_data.py && python cold_start.py && python train_grpo.py   # tiny Qwen2-VL, synthetic suite, CPU
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

Data: prepare_data.py's records. `interleave_under` (paper) trains on the pool the official loader builds,
datasets.interleave_datasets(probabilities=mixture, seed, stopping_strategy="first_exhausted"), for as many
epochs as max_steps needs, reshuffled each epoch; `with_replacement` picks a domain with probability w, then an
unseen example of it, reshuffling a domain it has used up. The whole sampling schedule is a function of (seed,
mixture, dataset sizes), so resuming at step k replays exactly the data an uninterrupted run would have seen.

Model: init_from, by default cold_start.py's output (the tiny model after its supervised cold start); the model
itself (loading, prompts, sampling, the log-probs of completions) is vlm.py's.

Outputs in out_dir: config.json, metrics.jsonl (one line per step; also to Weights & Biases with wandb_log),
samples.jsonl, ckpt-NNNNNN/ folders (save_pretrained weights that plain transformers loads + trainer/ with
optimizer, scheduler and RNG states, checksums.json written last: a folder without a valid one is incomplete and
is never loaded).
"""
import contextlib
import copy
import itertools
import json
import math
import os
import shutil
import sys
import time

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

import rewards
import vlm

# --- config -----------------------------------------------------------------------------------------------
# Defaults are the embedded CPU run (tiny model, synthetic suite); every GRPO setting that does not depend on
# scale is the paper's. Where the CPU run differs from the paper the comment says "paper: ...".
# Override: python train_grpo.py [config.json ...] [--key=value ...]; main() then reads each by its name.
# I/O
out_dir = "out/grpo"              # checkpoints, metrics.jsonl, samples.jsonl, config.json
data_dir = "data"                 # prepare_data.py output: manifest.json + one folder per domain/split
resume = False                    # continue from the last complete checkpoint in out_dir
seed = 0
# model
init_from = "out/cold_start"      # cold_start.py's output (default), "tiny", a hub name
                                  # (Qwen/Qwen2-VL-2B-Instruct, paper: no cold start) or a save_pretrained folder
freeze_vision = True              # the vision tower is not trained (paper)
max_pixels = 0                    # image processor's max pixels per image (0: the model's own)
# data mixture
mixture = "uniform"               # "uniform", '{"syn_count": 2, "syn_ground": 1}', a {domain: w} JSON file,
                                  # or predict_mixture.py's mixtures.json
mixture_proposal = ""             # which proposal of a mixtures.json (default: its first)
sampling = "interleave_under"     # "interleave_under" (paper): epochs over the pool interleave_datasets builds,
                                  # which ends when its first domain is used up | "with_replacement"
max_steps = 150                   # GRPO steps; 0: one pass over the interleave_under pool
# GRPO
prompts_per_step = 4              # prompts per step over all processes (paper: 2)
num_generations = 6               # G, completions per prompt (paper: 6); a step's prompts x G completions are
                                  # split evenly over the processes, so a group may span processes (as in TRL)
micro_batch_size = 0              # completions per forward/backward (0: all of a process's); gradients accumulate
temperature = 1.0
max_prompt_length = 1024          # a longer prompt is an error naming the record (images cannot be cut)
system_prompt = "default"         # "default": the chat template's own | "r1": the official README's R1 prompt
                                  # (vlm.SYSTEM_PROMPTS), in HF and vLLM rollouts alike; give cold_start.py the same
max_completion_length = 128       # paper: 1024. The synthetic suite's longest reference answer (3 boxes) is 90
                                  # tokens; at 64, 41 % of correct detection answers were cut and scored 0
ignore_eos = False                # benchmarks: always generate max_completion_length tokens
epsilon_low = 0.2
epsilon_high = 0.2
beta = 0.04                       # k3 KL coefficient; 0 loads no reference model
scale_rewards = True              # divide advantages by the group std (False: Dr. GRPO)
loss_type = "token"               # "token": mean over the micro-batch's tokens (paper) | "sequence" | "dr_grpo"
num_iterations = 1                # mu: optimizer updates per batch of rollouts
reward_mode = "ours"              # "ours" | "official": score exactly as the official code (rewards.py's docstring
                                  # lists the differences; the three reward_* settings below then do not apply)
reward_weights = ""               # the official YAML's reward_weights by name, e.g. '{"format": 1.0, "iou": 2.0}'
                                  # ("": accuracy 2.0, format 1.0, the paper's)
reward_gate_on_format = True      # a failed format zeroes every reward (paper); False: the official code
reward_format_mode = "strict"     # "strict" (official regex) | "lenient"
reward_iou_threshold = 0.0        # 0: grounding reward is the IoU; e.g. 0.5: 1 when IoU > 0.5 (VLM-R1's)
# optimizer: AdamW, linear warm-up then linear decay
learning_rate = 1e-4              # paper: 1e-6 (a 2B model); the tiny model at 3e-4 unlearns what it sees (README)
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
wandb_log = False                 # also log metrics.jsonl's lines to Weights & Biases (WANDB_MODE=offline: no network)
wandb_project = "modomodo"
wandb_run_name = "grpo"
# --- end config -------------------------------------------------------------------------------------------

CONFIG_KEYS = [k for k, v in dict(globals()).items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str)) and k != "CONFIG_KEYS"]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}


# ----------------------------------------------------------------------------------------------------------
# settings: the globals above, overridden in place (as nanoGPT's configurator.py does); cold_start.py reads its
# own the same way

def print_help(script_file, doc):
    src = open(script_file).read()
    block = src[src.index("# --- config"):src.index("# --- end config")]
    print(doc.strip().split("\n\n")[0], "\n\nSettings (defaults):\n")
    print("\n".join(block.splitlines()[1:]))


def parse_value(text):
    """'3' -> 3, 'true' -> True, '{"a": 1}' -> dict, 'out/x' -> 'out/x'."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_config(config, key, value, where, script):
    if key not in config:
        raise SystemExit(f"error: unknown setting '{key}' ({where}); see python {script} --help")
    default = config[key]
    if isinstance(value, dict) and isinstance(default, str):
        value = json.dumps(value)  # a mixture given inline in a JSON config file
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise SystemExit(f"error: setting '{key}' ({where}) must be {type(default).__name__}, got {value!r}")
    config[key] = value


def read_settings(argv, defaults, script_file, doc):
    """defaults, then JSON config files, then --key=value, in the order given; -h prints the script's settings."""
    config = dict(defaults)
    script = os.path.basename(script_file)
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(script_file, doc)
            sys.exit(0)
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            set_config(config, key, parse_value(text) if has_value else True, arg, script)
        else:
            try:
                with open(arg) as f:
                    overrides = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: cannot read config file {arg}: {e}")
            for key, value in overrides.items():
                if not key.startswith("_"):  # "_comment" and the like document a config file
                    set_config(config, key, value, arg, script)
    return config


def parse_config(argv):
    """This script's settings from argv (read_settings), checked."""
    config = read_settings(argv, DEFAULTS, __file__, __doc__)
    for key, allowed in [("sampling", ("interleave_under", "with_replacement")),
                         ("loss_type", ("token", "sequence", "dr_grpo")),
                         ("reward_format_mode", ("strict", "lenient")),
                         ("reward_mode", rewards.REWARD_MODES)]:
        if config[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {allowed}, got {config[key]!r}")
    if config["max_steps"] < 0:
        raise SystemExit(f"error: max_steps must be >= 0 (0: until a domain is exhausted), got {config['max_steps']}")
    try:
        scoring_options(**reward_settings(config))
        vlm.system_prompt_text(config["system_prompt"])
    except ValueError as e:  # a bad reward_weights, reward_iou_threshold or system_prompt
        raise SystemExit(f"error: {e}")
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
# data: manifest, mixture, sampling schedule, and which completion is whose

def load_train_split(data_dir, manifest, domain):
    return vlm.open_split(data_dir, manifest, domain, "train")


def training_domains(manifest):
    return sorted(d for d, info in manifest["datasets"].items() if "train" in info["splits"])


def resolve_mixture(spec, proposal, domains, setting="--mixture"):
    """{domain: weight} normalised to sum 1, from "uniform", inline JSON, a JSON file or a mixtures.json; errors
    name the setting it was given as."""
    if spec == "uniform":
        raw = {d: 1.0 for d in domains}
    else:
        if spec.lstrip().startswith("{"):
            try:
                raw, where = json.loads(spec), setting
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {setting} is not valid JSON ({e}); write it as "
                                 """'{"syn_count": 2, "syn_ground": 1}'""")
        else:
            try:
                with open(spec) as f:
                    raw, where = json.load(f), spec
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"error: cannot read mixture file {spec}: {e}")
        raw = mixture_weights_of(raw, proposal, where)
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


def describe_mixture(weights, domains, data_dir):
    """The line that says what a run trains on: a manifest left short by a killed prepare_data.py shows here."""
    shares = ", ".join(f"{d} {w:.3g}" for d, w in weights.items())
    return f"training on {len(weights)} of the {len(domains)} training domain(s) in {data_dir}: {shares}"


def mixture_weights_of(raw, proposal, where):
    """The {domain: weight} object of a mixture file: itself, a mixtures.json's chosen proposal (predict_mixture.py)
    or a run's config.json's "mixture"; anything else is an error naming the file."""
    if not isinstance(raw, dict):
        raise SystemExit(f"error: mixture ({where}) must be a JSON object {{domain: weight}}, got "
                         f"{type(raw).__name__} {json.dumps(raw)[:60]}")
    if "proposals" in raw:  # predict_mixture.py output
        proposals = [p for p in raw["proposals"] if isinstance(p, dict)] if isinstance(raw["proposals"], list) else []
        chosen = [p for p in proposals if p.get("name") == proposal] if proposal else proposals[:1]
        if not chosen:
            names = [p.get("name") for p in proposals]
            raise SystemExit(f"error: no proposal named {proposal!r} in {where}; it has {names}")
        if not isinstance(chosen[0].get("mixture"), dict):
            raise SystemExit(f"error: proposal {chosen[0].get('name')!r} in {where} has no \"mixture\" object "
                             "{domain: weight}; rerun predict_mixture.py")
        return chosen[0]["mixture"]
    if "mixture" in raw and isinstance(raw["mixture"], dict):  # a run's config.json
        return raw["mixture"]
    return raw


def interleave_under_pool(weights, sizes, seed):
    """The finite pool of (domain, row) the official loader trains on: datasets.interleave_datasets over the
    domains' rows in their stored order, with the mixture as probabilities, the seed, and
    stopping_strategy="first_exhausted", so the pool ends at the pick that takes a domain's last row. Its
    domain proportions are the mixture's, up to the draws; a small domain with a large weight makes it short."""
    from datasets import Dataset, interleave_datasets
    domains = sorted(weights)
    empty = [d for d in domains if sizes[d] == 0]
    if empty:
        raise SystemExit(f"error: the training split of {empty} has no rows; drop it from the mixture")
    rows = [Dataset.from_dict({"domain": [d] * sizes[d], "row": np.arange(sizes[d])}) for d in domains]
    pool = interleave_datasets(rows, probabilities=[weights[d] for d in domains], seed=seed,
                               stopping_strategy="first_exhausted").to_dict()  # to_dict: 10x faster than columns
    return list(zip(pool["domain"], pool["row"]))


def build_schedule(weights, sizes, prompts_per_step, max_steps, sampling, seed):
    """The (domain, row) of every prompt of every step, a function of (seed, mixture, sizes) alone.

    interleave_under (the paper): epochs over interleave_under_pool, each a fresh seeded permutation of the pool
    (the trainer's random sampler), prompts_per_step at a time, until max_steps; a step may span two epochs.
    max_steps <= 0: one pass over the pool (the official README's "if one of the dataset is exhausted, the
    training would end"), an incomplete last step dropped.
    with_replacement: each prompt picks a domain with probability w, then that domain's next unseen row (a seeded
    permutation, reshuffled when used up).
    """
    rng = np.random.default_rng(seed)
    if sampling == "interleave_under":
        pool = interleave_under_pool(weights, sizes, seed)
        n_prompts = max_steps * prompts_per_step if max_steps > 0 else len(pool) // prompts_per_step * prompts_per_step
        stream = []
        while len(stream) < n_prompts:
            stream += [pool[i] for i in rng.permutation(len(pool))]
        return [stream[i:i + prompts_per_step] for i in range(0, n_prompts, prompts_per_step)]
    domains = sorted(weights)
    p = np.array([weights[d] for d in domains])
    order = {d: rng.permutation(sizes[d]) for d in domains}
    position = {d: 0 for d in domains}
    schedule = []
    while len(schedule) < max_steps:
        step = []
        for d in rng.choice(domains, size=prompts_per_step, p=p):
            d = str(d)
            if position[d] == sizes[d]:
                order[d], position[d] = rng.permutation(sizes[d]), 0
            step.append((d, int(order[d][position[d]])))
            position[d] += 1
        schedule.append(step)
    return schedule


def group_layout(prompts_per_step, num_generations, rank, world, micro_batch_size):
    """The one rule of who owns which completion. A step has prompts_per_step x G completions; completion i
    answers prompt i // G, so a group is G consecutive completions. They are split evenly, in order, over the
    processes (a group may span processes, as in TRL), so gathering per-process results in rank order restores
    whole groups. Returns this process's completion indices (a range) and the prompt each answers."""
    n_completions = prompts_per_step * num_generations
    per = n_completions // world
    if n_completions % world or (micro_batch_size and per % micro_batch_size):
        raise SystemExit(f"error: a step's {n_completions} completions (prompts_per_step x num_generations) must "
                         f"split evenly over {world} process(es) into micro-batches of micro_batch_size="
                         f"{micro_batch_size}")
    owned = range(rank * per, (rank + 1) * per)
    return owned, [i // num_generations for i in owned]


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
    """Weights as a save_pretrained folder, optimizer/scheduler/RNG of every process under trainer/. A write that
    fails (a full disk) stops every process with a message about space; the last complete checkpoint stays."""
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(os.path.join(tmp, "trainer"))  # every process writes its RNG state
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        error = e
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; a collective
    if accelerator.is_main_process and error is None:
        try:
            vlm.save_policy(accelerator.unwrap_model(model), tokenizer, image_processor, tmp, state_dict=state_dict)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)
            vlm.write_checksums(tmp)
            if os.path.isdir(final):  # re-saving a step after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
        except (OSError, RuntimeError) as e:
            error = e
    stop_if_any_failed(accelerator, error and checkpoint_write_failure(final, tmp, model, error))
    return final


def checkpoint_write_failure(final, tmp, model, error):
    """The message for a checkpoint write that failed, after the partial folder is removed to give the space back."""
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(os.path.dirname(final) or ".").free
    # weights + AdamW's two moments of the trained ones; the tokenizer and RNG states are small
    need = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in model.parameters())
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"writing checkpoint {final} failed ({reason}); the disk holding it has {free / 2**20:.0f} MiB free and "
            f"a checkpoint takes about {need / 2**20:.0f} MiB: free some space (or move out_dir) and rerun with "
            "--resume; the last complete checkpoint is kept")


def rng_state_problem(trainer_dir, rank):
    """None if this process's RNG state in a checkpoint loads, else why not. accelerate's load_state only logs a
    state it cannot load (at INFO) and goes on with the current RNG, so the resumed run silently diverges from the
    uninterrupted one; the same load and the same setstate calls, on throwaway generators, run here first."""
    import random
    from accelerate.utils import load
    path = os.path.join(trainer_dir, f"random_states_{rank}.pkl")
    try:
        states = load(path)
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except Exception as e:  # whatever stops accelerate from restoring it
        return (f"the RNG state {path} cannot be loaded ({type(e).__name__}: {str(e).strip()[:200]}); resuming without "
                "it would not replay the interrupted run: resume from an earlier checkpoint (move this one away) or "
                "start a new out_dir")
    return None


def skip_model_weights_in_trainer_state(accelerator):
    """accelerate's save_state/load_state would store the weights a second time; save_pretrained has them."""
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())


# ----------------------------------------------------------------------------------------------------------
# model, rollouts, the update's inputs

def load_start_model(init_from, seed, max_pixels, freeze_vision):
    """The policy to start from: cold_start.py's output by default. A missing local folder or an interrupted
    one is a one-line error (before anything else loads), not a hub lookup."""
    local = init_from.startswith((".", "/")) or init_from == DEFAULTS["init_from"] or \
        os.path.isdir(init_from.split("/")[0])
    if local and not os.path.isdir(init_from):
        hint = "run `python cold_start.py` first" if init_from == DEFAULTS["init_from"] else "check --init_from"
        raise SystemExit(f"error: init_from={init_from} is not a folder: {hint} (or set --init_from=tiny, a hub "
                         "model or a save_pretrained folder)")
    problem = vlm.checkpoint_problem(init_from) if os.path.isdir(init_from) else None
    if problem and os.path.isfile(os.path.join(init_from, vlm.CHECKSUMS)):
        raise SystemExit(f"error: init_from={init_from} is {problem}; rerun the stage that wrote it")
    model, tokenizer, image_processor = vlm.load_policy(init_from, seed=seed, max_pixels=max_pixels)
    if freeze_vision:
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


def distinct_prompts(tokenizer, image_processor, records, prompt_of, system_text, max_prompt_length=None):
    """Model inputs of each distinct prompt among prompt_of (in order), under the system prompt's text, and the
    row of each completion's prompt in them: a prompt's completions share one encoding of it (and of its image)."""
    order = list(dict.fromkeys(prompt_of))
    batch = vlm.encode_prompts(tokenizer, image_processor, [records[p][0] for p in order],
                               [records[p][1] for p in order], max_prompt_length, system_text)
    return batch, torch.tensor([order.index(p) for p in prompt_of])


def rollout_hf(accelerator, model, tokenizer, image_processor, records, prompt_of, where, system_text,
               max_prompt_length, max_completion_length, temperature, ignore_eos):
    """One completion per owned slot, each distinct prompt encoded once for all its completions. A failure on
    any process stops every process (none waits in a collective for it). Returns (completions, None)."""
    error = completions = None
    try:
        prompts, prompt_row = distinct_prompts(tokenizer, image_processor, records, prompt_of, system_text,
                                               max_prompt_length)
        with full_weights(accelerator, model) as policy:
            completions = vlm.generate(policy, tokenizer, prompts, n=prompt_row.bincount().tolist(),
                                       max_new_tokens=max_completion_length, temperature=temperature,
                                       min_new_tokens=max_completion_length if ignore_eos else 0)
    except Exception as e:  # reported on every process, so none waits in a collective for this one
        error = f"{where}: {type(e).__name__}: {e}"
    stop_if_any_failed(accelerator, error)
    return completions, None


def rollout_vllm(accelerator, client, tokenizer, records, owned, num_generations, system_text, max_prompt_length,
                 max_completion_length, temperature, ignore_eos, vllm_logprobs):
    """The main process asks the server for the step's prompts x G completions (n = G per prompt, in
    group_layout's order) and shares them; each process keeps the ones it owns. A server failure is shared too,
    so no process waits for the others. Returns (completions, vLLM log-probs or None) of the owned slots."""
    from accelerate.utils import broadcast_object_list
    result = [None, None, None]  # completions, logprobs, error
    if accelerator.is_main_process:
        try:
            out = client.generate_for(tokenizer, [r[0] for r in records], [r[1] for r in records], max_prompt_length,
                                      system_text, n=num_generations, max_new_tokens=max_completion_length,
                                      temperature=temperature, ignore_eos=ignore_eos, logprobs=vllm_logprobs)
            result[:2] = out if vllm_logprobs else (out, None)
        except Exception as e:  # vlm.VLLMServerError above all; shared so every process stops
            result[2] = f"{type(e).__name__}: {e}"
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    completions, logprobs, error = result
    if error:
        raise TrainingStopped(f"vLLM rollout failed: {error}; the last checkpoint is kept")
    return [completions[i] for i in owned], (None if logprobs is None else [logprobs[i] for i in owned])


def connect_vllm(accelerator, model, image_processor, url, timeout, retries, sync_dir, log):
    """The client of a running server (main process only), after a health check and a first weight sync: the
    server starts from whatever folder it was given, while the policy may be a cold start or a resume."""
    client, error = None, None
    if accelerator.is_main_process:
        client = vlm.VLLMClient(url, image_processor, timeout=timeout, retries=retries)
        try:
            log(f"vLLM server at {url} serves {client.check_health(weight_sync=True)['id']}")
        except vlm.VLLMServerError as e:
            error = str(e)
    stop_if_any_failed(accelerator, error)
    log(f"weights synced to the vLLM server in {sync_vllm_weights(accelerator, model, client, sync_dir):.2f} s")
    return client


def micro_batch_inputs(accelerator, model, ref_model, tokenizer, image_processor, records, prompt_of, completions,
                       rows, system_text, temperature, num_iterations):
    """What one micro-batch (rows: indices among this process's completions) feeds every update of the step: its
    prompts, padded completions, their advantages' rows, and the log-probs that stay fixed over the num_iterations
    updates: the reference model's (for the KL) and, when mu > 1, the pre-update policy's (for the ratio)."""
    prompts, prompt_row = distinct_prompts(tokenizer, image_processor, records, [prompt_of[i] for i in rows],
                                           system_text)
    prompts = {name: v.to(accelerator.device) for name, v in prompts.items()}
    prompt_row = prompt_row.to(accelerator.device)
    ids, mask = vlm.pad_completions([completions[i] for i in rows], tokenizer.pad_token_id, accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        ref_logp = vlm.completion_logprobs(ref_model, prompts, ids, mask, temperature,
                                           prompt_row) if ref_model is not None else None
        old_logp = vlm.completion_logprobs(model, prompts, ids, mask, temperature,
                                           prompt_row) if num_iterations > 1 else None
    return dict(rows=rows, prompts=prompts, prompt_row=prompt_row, ids=ids, mask=mask, ref_logp=ref_logp,
                old_logp=old_logp)


def server_logprob_gap(logp, server_logprobs, rows, mask):
    """Mean |trainer - vLLM| log-prob over the sampled tokens of a micro-batch (the vllm_logprobs diagnostic)."""
    served = torch.zeros_like(logp)  # not pad_completions: its integer tensor truncates them
    for row, i in enumerate(rows):
        served[row, :len(server_logprobs[i])] = torch.tensor(server_logprobs[i])
    return (((logp.detach() - served).abs() * mask).sum() / mask.sum()).item()


def optimizer_step(accelerator, optimizer, scheduler, params, grad_clip, losses, step, timings):
    """Clip, step, zero; a non-finite loss, gradient or weight stops the run (the last good checkpoint stays).
    Returns the gradient norm before clipping."""
    with timed(timings, "optimizer"):
        return _optimizer_step(accelerator, optimizer, scheduler, params, grad_clip, losses, step)


def _optimizer_step(accelerator, optimizer, scheduler, params, grad_clip, losses, step):
    grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip))
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
    return grad_norm


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


REWARD_SETTINGS = ("reward_mode", "reward_weights", "reward_gate_on_format", "reward_format_mode",
                   "reward_iou_threshold")


def scoring_options(reward_mode, reward_weights, reward_gate_on_format, reward_format_mode, reward_iou_threshold):
    """rewards.score's keywords from the reward_* settings; ValueError names a bad one."""
    threshold = reward_iou_threshold or None
    rewards.check_iou_threshold(threshold)
    return dict(reward_mode=reward_mode, reward_weights=rewards.read_reward_weights(reward_weights),
                gate_on_format=reward_gate_on_format, format_mode=reward_format_mode, iou_threshold=threshold)


def reward_settings(config):
    """The REWARD_SETTINGS of a settings dict, as scoring_options' keywords."""
    return {k: config[k] for k in REWARD_SETTINGS}


def score_completions(texts, records, options):
    """rewards.score of each completion against the record it answers, under scoring_options."""
    return [rewards.score(text, solution, domain, meta, **options)
            for text, (_, _, solution, domain, meta) in zip(texts, records)]


def check_finite_rewards(accelerator, scores, ids, step):
    bad = [i for i, s in enumerate(scores) if not all(math.isfinite(v) for v in s.values())]
    stop_if_any_failed(accelerator, f"non-finite reward at step {step + 1} for record {ids[bad[0]]}: "
                                    f"{scores[bad[0]]}" if bad else None)


@contextlib.contextmanager
def timed(timings, key):
    """Adds the seconds the block takes to timings[key] (the t_* fields of metrics.jsonl)."""
    start = time.perf_counter()
    yield
    timings[key] += time.perf_counter() - start


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def step_metrics(step, gathered, grad_norms, lr, timings, vllm_logprobs):
    """One metrics.jsonl line from every process's (scores, domains, lengths, losses, kls, clip fractions,
    vLLM log-prob gaps, cut-off flags) of the step. clipped_fraction: the completions that reached
    max_completion_length without their end token (cut off: a format failure, reward 0), as TRL logs it."""
    all_scores = [s for g in gathered for s in g[0]]
    all_domains = [d for g in gathered for d in g[1]]
    all_lengths = [n for g in gathered for n in g[2]]
    m = {"step": step, "loss": mean(mean(g[3]) for g in gathered), "kl": mean(mean(g[4]) for g in gathered),
         "clip_fraction": mean(mean(g[5]) for g in gathered), "grad_norm": mean(grad_norms), "lr": lr,
         "reward": mean(s["total"] for s in all_scores), "completion_length": mean(all_lengths),
         "clipped_fraction": mean(cut for g in gathered for cut in g[7])}
    for d in sorted(set(all_domains)):
        m[f"reward/{d}"] = mean(s["total"] for s, dd in zip(all_scores, all_domains) if dd == d)
    for name in sorted({k for s in all_scores for k in s if k != "total"}):
        m[f"reward_fn/{name}"] = mean(s[name] for s in all_scores if name in s)
    m["samples_per_s"] = len(all_scores) / timings["step"]
    m["tokens_per_s"] = sum(all_lengths) / timings["step"]
    m.update({f"t_{key}": seconds for key, seconds in timings.items()})
    if torch.cuda.is_available():  # the main process's peak so far: what decides the batch a GPU can hold
        m["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if vllm_logprobs:
        m["vllm_logprob_abs_diff"] = mean(d for g in gathered for d in g[6])
    return m


def sample_group(step, ids, records, prompt_of, texts, scores):
    """The completions (with rewards) of this process's first prompt, for samples.jsonl."""
    p = prompt_of[0]
    problem, _, solution, domain, _ = records[p]
    return {"step": step, "id": ids[p], "domain": domain, "problem": problem, "solution": solution,
            "completions": [{"text": t, "reward": s} for t, s, q in zip(texts, scores, prompt_of) if q == p]}


def start_wandb(project, run_name, run_info):
    """A Weights & Biases run (the tracker the paper's code logs to) that gets metrics.jsonl's lines; imported
    only when wandb_log is on, so a plain run needs neither the package nor an account."""
    import wandb
    return wandb.init(project=project, name=run_name, config=run_info)


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def check_out_dir(out_dir):
    """out_dir exists (made if missing) and takes a file: a file in its place or a read-only place is a one-line
    error at start, not after the model has loaded."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: out_dir={out_dir} is a file, not a folder: choose another --out_dir")
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: out_dir={out_dir} is not writable ({e.strerror}): choose another --out_dir")


def resume_point(out_dir, resume, run_info, log):
    """(step, checkpoint folder) to resume from, or (0, None) to start: with resume the last complete checkpoint, if
    it was written with these settings. Every refusal is here, before the model loads. A run stopped before its
    first checkpoint is started over, with or without resume."""
    step, folder = last_good_checkpoint(out_dir, log) if resume else (None, None)
    if folder is not None:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            saved = json.load(f)
        if saved["mixture_weights"] != run_info["mixture_weights"] or \
                saved["planned_steps"] != run_info["planned_steps"]:
            raise SystemExit(f"error: {folder} was written by a run with another mixture or schedule; "
                             "resume with the same settings or start a new out_dir")
        changed = changed_settings(saved["config"], run_info["config"])
        if changed:  # refused before config.json is written: it only ever records settings that ran
            raise SystemExit(f"error: --resume with settings the run in {out_dir} did not start with: "
                             f"{', '.join(changed)}; a resumed run keeps its schedule, optimizer, reference model and "
                             "RNG, so they cannot apply: resume with its settings (config.json) or start a new out_dir")
        return step, folder
    if find_checkpoints(out_dir):
        raise SystemExit(f"error: --resume but no complete checkpoint in {out_dir}" if resume else
                         f"error: {out_dir} already has checkpoints: pass --resume or choose another out_dir")
    if resume and not os.path.isfile(os.path.join(out_dir, "metrics.jsonl")):
        raise SystemExit(f"error: --resume but {out_dir} holds no run (no checkpoint, no metrics.jsonl)")
    return 0, None


def start_or_resume(accelerator, model, out_dir, step, folder, run_info, log):
    """From resume_point's checkpoint: its weights, optimizer, scheduler and RNG states are loaded and metrics and
    samples are cut after its step; without one, logs no checkpoint covers are discarded. Writes config.json."""
    if folder is not None:
        vlm.load_weights(accelerator.unwrap_model(model), folder)
        stop_if_any_failed(accelerator, rng_state_problem(os.path.join(folder, "trainer"), accelerator.process_index))
        accelerator.load_state(os.path.join(folder, "trainer"))  # optimizer, scheduler, every process's RNG
        log(f"resumed from {folder} at step {step}")
        if accelerator.is_main_process:
            truncate_jsonl(os.path.join(out_dir, "metrics.jsonl"), step, log)
            truncate_jsonl(os.path.join(out_dir, "samples.jsonl"), step, log)
    elif accelerator.is_main_process:
        discard_unsaved_logs(out_dir, log)
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        vlm.write_json_atomic(os.path.join(out_dir, "config.json"), run_info)
    accelerator.wait_for_everyone()


# Settings a resumed run may change: where things are, logging, and how rollouts are served. The mixture and
# max_steps may be spelled differently as long as the weights and the number of steps stay (checked apart).
RESUMABLE = {"out_dir", "data_dir", "resume", "checkpoint_every", "log_samples_every", "wandb_log", "wandb_project",
             "wandb_run_name", "rollout_engine", "vllm_url", "vllm_timeout", "vllm_retries", "vllm_sync_every",
             "vllm_sync_dir", "vllm_logprobs", "mixture", "mixture_proposal", "max_steps"}


def changed_settings(saved, current):
    """'name old -> new' of each setting that differs from the checkpoint's and cannot change on a resume."""
    return [f"{key} {saved[key]!r} -> {current[key]!r}" for key in sorted(saved.keys() & current.keys())
            if key not in RESUMABLE and saved[key] != current[key]]


def discard_unsaved_logs(out_dir, log):
    """The logs of a run stopped before its first checkpoint hold steps no checkpoint can continue; a new run
    starts over from step 1, so they go (appending to them would log steps 1, 2, 3, 1, 2, ...)."""
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    logged = sum(1 for line in open(metrics_path) if line.strip()) if os.path.isfile(metrics_path) else 0
    for name in ("metrics.jsonl", "samples.jsonl", "metrics.png"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    if logged:
        log(f"{out_dir} held {logged} logged step(s) of a run stopped before its first checkpoint: starting over "
            "from step 1, its metrics.jsonl and samples.jsonl replaced")


def truncate_jsonl(path, last_step, log=print):
    """Drop lines of steps after last_step (a resumed run rewrites them). A last line that is not JSON, a write
    cut by a full disk or a kill, is dropped too (and said); an unreadable line before it is an error."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line.rstrip("\n") + "\n" for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            if number < len(lines):
                raise SystemExit(f"error: {path} line {number} is not JSON; delete that line and resume again")
            log(f"{path}: dropped its last line, cut while it was written: {line.strip()[:60]!r}")
            break
        if step <= last_step:
            kept.append(line)
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
    globals().update(config)  # from here on every setting is read by its plain name, as in nanoGPT
    scoring = scoring_options(reward_mode, reward_weights, reward_gate_on_format, reward_format_mode,
                              reward_iou_threshold)
    system_text = vlm.system_prompt_text(system_prompt)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # accelerate (1.15) shards only on accelerators: on CPU an FSDP launch fails in its plugin or runs unsharded
        raise SystemExit("error: accelerate's FSDP needs GPUs; on CPU launch with torchrun or accelerate without "
                         "config/accelerate_fsdp.yaml (README: Processes)")
    # bf16 autocast over fp32 master weights on GPU: a bf16 weight cannot absorb a 1e-6 update.
    # step_scheduler_with_optimizer=False: our schedule counts optimizer updates, not per-process batches.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                              step_scheduler_with_optimizer=False)
    rank, world, log = accelerator.process_index, accelerator.num_processes, accelerator.print
    master = accelerator.is_main_process
    check_out_dir(out_dir)  # before anything slow loads

    # data: the mixture, and the (domain, row) of every prompt of every step, fixed by the seed
    manifest = vlm.load_manifest(data_dir)
    weights = resolve_mixture(mixture, mixture_proposal, training_domains(manifest))
    log(describe_mixture(weights, training_domains(manifest), data_dir))
    datasets = {d: load_train_split(data_dir, manifest, d) for d in weights}
    schedule = build_schedule(weights, {d: len(ds) for d, ds in datasets.items()}, prompts_per_step, max_steps,
                              sampling, seed)
    total_steps = len(schedule)
    if total_steps == 0:
        raise SystemExit("error: with max_steps=0, one pass over the interleave_under pool is shorter than one step "
                         "of prompts_per_step prompts; set max_steps > 0")
    owned, prompt_of = group_layout(prompts_per_step, num_generations, rank, world, micro_batch_size)
    run_info = {"config": config, "mixture_weights": weights, "planned_steps": total_steps, "processes": world,
                "start_from": init_from}
    start_step, resume_from = resume_point(out_dir, resume, run_info, log)  # refusals before the model loads

    # model, frozen reference (beta > 0), AdamW with linear warm-up then linear decay over the updates
    model, tokenizer, image_processor = load_start_model(init_from, seed, max_pixels, freeze_vision)
    ref_model = copy.deepcopy(model).requires_grad_(False).eval().to(accelerator.device) if beta != 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    total_updates = total_steps * num_iterations
    warmup = max(1, int(warmup_ratio * total_updates))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_updates))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    skip_model_weights_in_trainer_state(accelerator)
    set_seed(seed + rank)  # a resume then restores every process's RNG state as it was at the checkpoint

    start_or_resume(accelerator, model, out_dir, start_step, resume_from, run_info, log)
    metrics_path, samples_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "samples.jsonl")
    sync_dir = vllm_sync_dir or os.path.join(out_dir, "vllm_weights")
    client = connect_vllm(accelerator, model, image_processor, vllm_url, vllm_timeout, vllm_retries, sync_dir,
                          log) if rollout_engine == "vllm" else None
    tracker = start_wandb(wandb_project, wandb_run_name, run_info) if wandb_log and master else None

    model.train()
    end_token = tokenizer.convert_tokens_to_ids("<|im_end|>")  # where vlm.generate and the vLLM client stop
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="grpo",
               disable=not master, dynamic_ncols=True)
    for step in bar:
        timings = dict.fromkeys(["generate", "reward", "ref_old", "forward_backward", "optimizer", "sync"], 0.0)
        t_step = time.perf_counter()
        ids = [datasets[d][row]["id"] for d, row in schedule[step]]
        records = [record_fields(datasets[d][row]) for d, row in schedule[step]]
        my_records = [records[p] for p in prompt_of]  # the record each owned completion answers

        # 1. rollouts: one completion per owned slot
        with timed(timings, "generate"):
            if rollout_engine == "vllm":
                completions, server_logprobs = rollout_vllm(
                    accelerator, client, tokenizer, records, owned, num_generations, system_text, max_prompt_length,
                    max_completion_length, temperature, ignore_eos, vllm_logprobs)
            else:
                completions, server_logprobs = rollout_hf(
                    accelerator, model, tokenizer, image_processor, records, prompt_of,
                    f"step {step + 1}, records {ids}", system_text, max_prompt_length, max_completion_length,
                    temperature, ignore_eos)

        # 2. rewards here; advantages over whole groups, gathered from every process
        with timed(timings, "reward"):
            texts = [vlm.decode(tokenizer, c) for c in completions]
            scores = score_completions(texts, my_records, scoring)
            check_finite_rewards(accelerator, scores, [ids[p] for p in prompt_of], step)
            totals = accelerator.gather(torch.tensor([s["total"] for s in scores], device=accelerator.device)).cpu()
            advantages = group_advantages(totals.view(-1, num_generations), scale_rewards).view(-1)
            advantages = advantages[owned.start:owned.stop]

        # 3. the inputs of every micro-batch, with the log-probs that stay fixed over the updates (reference, old)
        lr = scheduler.get_last_lr()[0]  # the rate this step's (first) update uses
        size = micro_batch_size or len(owned)
        with timed(timings, "ref_old"):
            batches = [micro_batch_inputs(accelerator, model, ref_model, tokenizer, image_processor, records,
                                          prompt_of, completions, range(i, i + size), system_text, temperature,
                                          num_iterations)
                       for i in range(0, len(owned), size)]

        # 4. num_iterations optimizer updates over the same rollouts, gradients accumulated over the micro-batches
        losses, kls, clips, grad_norms, server_gaps = [], [], [], [], []
        for iteration, k in itertools.product(range(num_iterations), range(len(batches))):
            b, last = batches[k], k == len(batches) - 1
            # under DDP, gradients are all-reduced only at the last micro-batch of an update (no_sync before it)
            with timed(timings, "forward_backward"), \
                    (contextlib.nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                logp = vlm.completion_logprobs(model, b["prompts"], b["ids"], b["mask"], temperature, b["prompt_row"])
                loss, stats = grpo_loss(
                    logp=logp, old_logp=logp.detach() if b["old_logp"] is None else b["old_logp"],
                    ref_logp=logp.detach() if b["ref_logp"] is None else b["ref_logp"],
                    advantages=advantages[b["rows"].start:b["rows"].stop].to(logp.device), mask=b["mask"],
                    epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, loss_type=loss_type,
                    max_completion_length=max_completion_length)
                accelerator.backward(loss / len(batches))
            if server_logprobs is not None and iteration == 0:  # the weights that generated them
                server_gaps.append(server_logprob_gap(logp, server_logprobs, b["rows"], b["mask"]))
            losses.append(loss.item())
            kls.append(stats["kl"])
            clips.append(stats["clip_fraction"])
            if last:  # the update, timed as t_optimizer
                grad_norms.append(optimizer_step(accelerator, optimizer, scheduler, params, grad_clip, losses, step,
                                                 timings))
        if rollout_engine == "vllm" and (step + 1) % vllm_sync_every == 0 and step + 1 < total_steps:
            with timed(timings, "sync"):
                sync_vllm_weights(accelerator, model, client, sync_dir)

        # 5. metrics (metrics.jsonl, wandb), a sample group every log_samples_every steps, checkpoints
        cut_off = [c[-1:] != [end_token] for c in completions]  # completions end at their first end token
        mine = (scores, [r[3] for r in my_records], [len(c) for c in completions], losses, kls, clips, server_gaps,
                cut_off)
        gathered = gather_object([mine]) if world > 1 else [mine]
        timings["step"] = time.perf_counter() - t_step
        if master:
            metrics = step_metrics(step + 1, gathered, grad_norms, lr, timings, vllm_logprobs)
            append_jsonl(metrics_path, metrics)
            if tracker:
                tracker.log(metrics, step=step + 1)
            if log_samples_every and (step + 1) % log_samples_every == 0:
                append_jsonl(samples_path, sample_group(step + 1, ids, records, prompt_of, texts, scores))
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", s_per_step=f"{timings['step']:.2f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == total_steps:
            save_checkpoint(accelerator, model, tokenizer, image_processor, out_dir, step + 1,
                            {"step": step + 1, "mixture_weights": weights, "planned_steps": total_steps,
                             "config": config})
    if master:
        plot_metrics(metrics_path, os.path.join(out_dir, "metrics.png"))
        if tracker:
            tracker.finish()
    log(f"done: {total_steps} steps, checkpoints in {out_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
