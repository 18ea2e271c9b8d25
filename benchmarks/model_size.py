"""
How our GRPO step's time and peak memory grow with the model's size, on this machine (issue 17).

    python prepare_data.py && python benchmarks/model_size.py
    python benchmarks/model_size.py --sizes=128x2,384x6 --micro_batch_sizes=0 --steps=3

Each size WIDTHxLAYERS is a randomly initialised Qwen2-VL of the tiny model's architecture (vlm.tiny_config) with
that text width and depth: heads of 32 (as the tiny model's, so its M-RoPE sections still fit), two query heads
per key/value head, an MLP of 4x the width, the vision tower's merger projecting to the width (the tower itself is
the tiny one's: 2 blocks of 64). 128x2 is the tiny model. Each model is built once under OUT/models.
Each (size, micro-batch size) pair runs train_grpo.py in a fresh process with its default run's settings (4 prompts
x G = 6, beta 0.04 with a reference model, frozen vision tower, one torch thread unless OMP_NUM_THREADS is set) on
the prepared suite, every completion exactly --length tokens (EOS held back, so sizes do the same work). Printed:
parameters, the median step time over the timed steps and its split, completion tokens/s and the process's peak
RSS, each against the first size. Micro-batch size 0 is train_grpo.py's default (all 24 completions in one
forward/backward); a smaller one bounds the activations kept for the backward pass. Other work on the machine moves
the figures: compare rows of one invocation only.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import grpo_vs_trl  # noqa: E402  (its fresh-process runner and peak-RSS measurement)

HEAD_DIM = 32


def parse_size(text):
    try:
        width, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: write WIDTHxLAYERS, e.g. 256x4")
    if width < 2 * HEAD_DIM or width % (2 * HEAD_DIM) or layers < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: the width must be a multiple of {2 * HEAD_DIM} "
                                         f"(heads of {HEAD_DIM}, two per key/value head) and layers >= 1")
    return width, layers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--sizes", default="128x2,256x4,512x8",
                   help="comma-separated WIDTHxLAYERS text models (default 128x2,256x4,512x8: 0.8M, 4.4M, 32M)")
    p.add_argument("--micro_batch_sizes", default="0,6",
                   help="comma-separated train_grpo.py micro_batch_size values to run each size with (default 0,6)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them, >= 1 (default 2)")
    p.add_argument("--length", type=int, default=128,
                   help="tokens per completion, EOS held back (default 128, train_grpo.py's limit)")
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"), help="prepare_data.py output (default data/)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench_size"),
                   help="models, runs and report (default out/bench_size)")
    args = p.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",")]
        args.micro_batch_sizes = [int(m) for m in args.micro_batch_sizes.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if min(args.steps, args.warmup, args.length) < 1 or min(args.micro_batch_sizes) < 0:
        p.error("--steps, --warmup and --length must be >= 1, micro-batch sizes >= 0")
    return args


def build_model(width, layers, folder):
    """A random Qwen2-VL of the tiny model's architecture at this text width and depth, saved to folder; its
    parameter count."""
    import torch
    from transformers import AutoModelForImageTextToText
    import vlm
    tokenizer, image_processor = vlm.build_tiny_tokenizer(), vlm.build_tiny_image_processor()
    config = vlm.tiny_config("qwen2_vl", tokenizer)
    heads = width // HEAD_DIM
    config.text_config.update(dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                   layer_types=["full_attention"] * layers, num_attention_heads=heads,
                                   num_key_value_heads=heads // 2))
    config.vision_config.hidden_size = width  # the merger's output enters the text model
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        vlm.save_policy(model, tokenizer, image_processor, folder)
    return sum(p.numel() for p in model.parameters())


def run_settings(length, micro_batch_size):
    """train_grpo.py's defaults for the batch, every completion `length` tokens."""
    import train_grpo
    defaults = train_grpo.parse_config([])
    return {"prompts_per_step": defaults["prompts_per_step"], "num_generations": defaults["num_generations"],
            "max_completion_length": length, "ignore_eos": True, "micro_batch_size": micro_batch_size}


def table(rows):
    base = rows[0]
    lines = ["| text model | parameters | micro-batch | step (s) | vs first | generate / reference / fwd+bwd / optimizer "
             "(s) | completion tokens/s | peak RSS (GB) | vs first |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = " / ".join(f"{r['split'][k]:.2f}" for k in ("t_generate", "t_ref_old", "t_forward_backward",
                                                              "t_optimizer"))
        lines.append(f"| {r['width']}x{r['layers']} | {r['parameters'] / 1e6:.2f}M | {r['micro_batch_size'] or 'all'} "
                     f"| {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.1f}x | {split} | {r['tokens_per_s']:.0f} "
                     f"| {r['peak_mib'] / 1024:.2f} | {r['peak_mib'] / base['peak_mib']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.data_dir, "manifest.json")):
        raise SystemExit(f"error: {args.data_dir}/manifest.json not found: run `python prepare_data.py` first")
    from tqdm import tqdm
    args.out, args.data_dir = os.path.abspath(args.out), os.path.abspath(args.data_dir)
    grpo_vs_trl.CHILD_ENV.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    bar = tqdm(total=len(args.sizes) * len(args.micro_batch_sizes), desc="runs", dynamic_ncols=True)
    for width, layers in args.sizes:
        folder = os.path.join(args.out, "models", f"{width}x{layers}")
        parameters = build_model(width, layers, folder)
        for micro in args.micro_batch_sizes:
            run = grpo_vs_trl.run_ours(ROOT, run_settings(args.length, micro), folder, args.data_dir, args.warmup,
                                       args.steps, os.path.join(args.out, "runs", f"{width}x{layers}-mb{micro}"))
            step_s = statistics.median(run["step_s"])
            rows.append(dict(width=width, layers=layers, parameters=parameters, micro_batch_size=micro,
                             step_s=step_s, tokens_per_s=statistics.median(run["tokens"]) / step_s,
                             peak_mib=run["peak_mib"], split=run["split"]))
            bar.update()
    bar.close()
    report = [f"# GRPO step time and memory against model size {time.strftime('%Y-%m-%d')}",
              f"\n4 prompts x G = 6 completions of {args.length} tokens per step, beta 0.04 with a reference model, "
              f"frozen vision tower; median of {args.steps} timed steps after {args.warmup} warm-up steps, one fresh "
              f"process per row; {os.cpu_count()} CPU cores, OMP_NUM_THREADS={grpo_vs_trl.CHILD_ENV['OMP_NUM_THREADS']}."
              f" Split: mean seconds per step.\n", table(rows)]
    print("\n".join(report))
    with open(os.path.join(args.out, "model_size.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(args.out, "model_size.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(f"\nwritten: {args.out}/model_size.md, model_size.json")


if __name__ == "__main__":
    main()
