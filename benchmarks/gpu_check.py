"""
The prepared GPU check: GRPO at the paper's settings on a Qwen2-VL-2B-sized model, and evaluation, timed. Built to
finish within 8 minutes on one H100; prints steps/s, samples/s, completion tokens/s, peak GPU memory and MFU for
training, and items/s for evaluation, as a markdown table (--out also writes JSON).

    python benchmarks/gpu_check.py                       # one GPU: random-init Qwen2-VL-2B shape, bf16 autocast
    python benchmarks/gpu_check.py --fsdp                # the same through config/accelerate_fsdp.yaml (all GPUs)
    python benchmarks/gpu_check.py --model tiny --steps 2 --completion_length 8 --eval_limit 2   # CPU smoke test

Every stage is the project's own script run as a user runs it: prepare_data.py (the synthetic suite, small), then
train_grpo.py (2 prompts x G 6 completions of exactly 256 tokens per step: EOS held back; beta 0.04 with a
reference model; lr 1e-6; micro-batches of 4; HF rollouts), then evaluate.py on the final checkpoint. The 2B
model is random: its speed is the real model's, its answers are not. Needs requirements.txt installed; the weights
are built here from Qwen2-VL-2B-Instruct's published config (no hub access needed).

MFU counts 2 FLOPs per parameter per token for each forward (generation, reference, policy) and 4 more for the
policy's backward, over prompt and completion tokens; attention's own FLOPs and the frozen vision tower's backward
(none) are left out, so it slightly understates the work. Decoding 12 sequences is memory-bound: expect a low MFU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Dense bf16 peak FLOP/s by GPU name (vendor data sheets), for MFU; another GPU prints no MFU.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12}

# Qwen2-VL-2B-Instruct's config.json (text 1.5B, vision 0.67B), with the tiny tokenizer's token ids
QWEN2VL_2B = dict(
    text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-vl-2b-random",
                   help="qwen2-vl-2b-random (default), or anything train_grpo.py's init_from takes ('tiny', a folder)")
    p.add_argument("--steps", type=int, default=8, help="GRPO steps; the first is warm-up, not averaged (default 8)")
    p.add_argument("--completion_length", type=int, default=256, help="tokens per completion (default 256)")
    p.add_argument("--num_generations", type=int, default=6, help="G (default 6, the paper's)")
    p.add_argument("--eval_limit", type=int, default=32, help="evaluation items per test set (default 32)")
    p.add_argument("--fsdp", action="store_true", help="train through accelerate launch with "
                   "config/accelerate_fsdp.yaml on every visible GPU (exercises sharded rollouts and the shard gather)")
    p.add_argument("--work_dir", default="", help="data, model and run folders (default: a temporary folder)")
    p.add_argument("--out", default="", help="also write the results here as JSON")
    return p.parse_args(argv)


def run(argv, what):
    """A stage as a user runs it; its output goes to the terminal. A failure stops the check, naming the stage."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=ROOT)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {what} failed (exit code {done.returncode}): {' '.join(argv)}")
    return time.perf_counter() - started


def build_2b_model(folder):
    """A randomly initialised model of Qwen2-VL-2B's shape, saved as a folder train_grpo.py loads (bf16 on disk)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    import vlm
    tokenizer = vlm.build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = Qwen2VLConfig(text_config=dict(QWEN2VL_2B["text"], **special), vision_config=QWEN2VL_2B["vision"],
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 2.2B weights on a GPU: seconds
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids("<|im_end|>"), ids("<|endoftext|>")
    vlm.save_policy(model.cpu(), tokenizer, vlm.build_tiny_image_processor(), folder)


def step_flops(init_from, data_dir, prompts_per_step, G, completion_length):
    """Model FLOPs of one GRPO step (see the docstring): 10 x text parameters x tokens, plus 3 vision forwards."""
    import torch
    import train_grpo
    import vlm
    model, tokenizer, image_processor = vlm.load_policy(init_from, dtype=torch.bfloat16)
    text_params = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    manifest = vlm.load_manifest(data_dir)
    records = [train_grpo.record_fields(train_grpo.load_train_split(data_dir, manifest, d)[0])
               for d in train_grpo.training_domains(manifest)]
    batch = vlm.encode_prompts(tokenizer, image_processor, [r[0] for r in records], [r[1] for r in records])
    prompt_tokens = batch["attention_mask"].sum().item() / len(records)  # mean over one record per domain
    patches = batch["pixel_values"].shape[0] / len(records)
    tokens = prompts_per_step * prompt_tokens + prompts_per_step * G * completion_length
    return 10 * text_params * tokens + 3 * 2 * vision_params * patches * prompts_per_step, text_params + vision_params


def peak_flops(name):
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def main(argv):
    args = parse_args(argv)
    import torch
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    data_dir, run_dir = os.path.join(work, "data"), os.path.join(work, "run")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    print(f"gpu_check: {gpu}, torch {torch.__version__}, work folder {work}", flush=True)
    started = time.perf_counter()

    run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--data_dir", data_dir, "--n_train", "64",
         "--n_test", str(max(1, args.eval_limit))], "prepare_data.py")
    init_from = args.model
    if args.model == "qwen2-vl-2b-random":
        init_from = os.path.join(work, "qwen2-vl-2b-random")
        if not os.path.isfile(os.path.join(init_from, "config.json")):
            build_2b_model(init_from)
    flops, n_params = step_flops(init_from, data_dir, 2, args.num_generations, args.completion_length)

    launcher = [sys.executable]
    if args.fsdp:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    os.path.join(ROOT, "config", "accelerate_fsdp.yaml"), f"--num_processes={torch.cuda.device_count()}"]
    # the paper's settings (config/paper_qwen2vl_2b.json) at a fixed completion length
    train_seconds = run([*launcher, os.path.join(ROOT, "train_grpo.py"), os.path.join(ROOT, "config", "paper_qwen2vl_2b.json"),
                         f"--init_from={init_from}", f"--data_dir={data_dir}", f"--out_dir={run_dir}",
                         f"--max_steps={args.steps}", f"--checkpoint_every={args.steps}", "--log_samples_every=0",
                         f"--num_generations={args.num_generations}", f"--max_completion_length={args.completion_length}",
                         "--ignore_eos", f"--micro_batch_size={min(4, 2 * args.num_generations)}"], "train_grpo.py")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    timed = rows[1:] or rows  # the first step compiles kernels and fills caches
    step_s = sum(r["t_step"] for r in timed) / len(timed)
    checkpoint = os.path.join(run_dir, f"ckpt-{args.steps:06d}")
    run([sys.executable, os.path.join(ROOT, "evaluate.py"), checkpoint, "--data_dir", data_dir,
         "--limit", str(args.eval_limit), "--max_new_tokens", str(args.completion_length)], "evaluate.py")
    with open(os.path.join(run_dir, "eval", os.path.basename(checkpoint), f"limit-{args.eval_limit}",
                           "results.json")) as f:
        evaluation = json.load(f)
    items = sum(b["n"] for b in evaluation["benchmarks"].values())

    peak = peak_flops(gpu)
    results = {
        "gpu": gpu, "model": args.model, "parameters": n_params, "fsdp": args.fsdp, "steps_timed": len(timed),
        "steps_per_s": 1 / step_s, "samples_per_s": sum(r["samples_per_s"] for r in timed) / len(timed),
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "completion_tokens_per_step": sum(r["completion_length"] for r in timed) / len(timed) * 2 * args.num_generations,
        "seconds_per_step": {k[2:]: sum(r[k] for r in timed) / len(timed) for k in timed[0] if k.startswith("t_")},
        "gpu_peak_memory_gib": timed[-1].get("gpu_peak_memory_gib"),
        "model_tflops_per_step": flops / 1e12, "mfu": flops / step_s / peak if peak else None,
        "eval_items": items, "eval_items_per_s": items / evaluation["seconds"],
        "train_wall_s": train_seconds, "total_wall_s": time.perf_counter() - started,
    }
    print_table(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def print_table(r):
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a (no peak FLOP/s known for this device)"
    memory = f"{r['gpu_peak_memory_gib']:.1f} GiB" if r["gpu_peak_memory_gib"] is not None else "n/a (no GPU)"
    split = ", ".join(f"{k} {v:.2f}" for k, v in r["seconds_per_step"].items() if k != "step")
    print(f"\n| {r['gpu']} | {r['model']} ({r['parameters'] / 1e6:,.1f}M parameters){' FSDP' if r['fsdp'] else ''} |\n|---|---|\n"
          f"| GRPO steps/s (mean of {r['steps_timed']}) | {r['steps_per_s']:.3f} |\n"
          f"| samples/s | {r['samples_per_s']:.2f} |\n| completion tokens/s | {r['tokens_per_s']:.0f} |\n"
          f"| seconds per step: {split} | {1 / r['steps_per_s']:.2f} |\n"
          f"| peak GPU memory | {memory} |\n| MFU ({r['model_tflops_per_step']:.1f} TFLOP per step) | {mfu} |\n"
          f"| evaluation items/s ({r['eval_items']} items) | {r['eval_items_per_s']:.2f} |\n"
          f"| wall time: training {r['train_wall_s']:.0f} s, all {r['total_wall_s']:.0f} s | |")


if __name__ == "__main__":
    main(sys.argv[1:])
