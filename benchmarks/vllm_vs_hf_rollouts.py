"""
Rollout throughput of a vLLM server against the trainer's HF rollouts (vlm.generate on the HF model), on the same
prompts and images, the same n and the same number of generated tokens (vLLM ignores EOS, vlm.generate holds it
back), and the time of one weight sync (write_weights + reload_weights: reload, encoder and prefix cache resets).
Prints a markdown table; --out also writes JSON.

    bash scripts/setup_vllm_cpu.sh
    OMP_WAIT_POLICY=PASSIVE python benchmarks/vllm_vs_hf_rollouts.py            # starts its own CPU server
    python benchmarks/vllm_vs_hf_rollouts.py --url http://127.0.0.1:8000 --model MODEL_DIR   # a running server

With --url the server must serve the same weights as --model (a vlm.save_for_vllm folder of it).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vlm  # noqa: E402
import vllm_cpu_server  # noqa: E402  (next to this file)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny", help="'tiny', a model folder or a hub name (default tiny)")
parser.add_argument("--url", default=None, help="a running vLLM server; default: start scripts/serve_vllm_cpu.sh")
parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (default 8)")
parser.add_argument("--n", type=int, default=4, help="completions per prompt, GRPO's G (default 4)")
parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens per completion (default 64)")
parser.add_argument("--repeats", type=int, default=3, help="timed batches per engine, after one warm-up (default 3)")
parser.add_argument("--hf_threads", type=int, default=1,
                    help="torch threads for the HF rollouts (default 1: the CPU server's worker uses one core)")
parser.add_argument("--out", default=None, help="also write the results here as JSON")
args = parser.parse_args()

torch.set_num_threads(args.hf_threads)
model, tokenizer, image_processor = vlm.load_policy(args.model)
model.eval()

rng = np.random.default_rng(0)
sizes = [(56, 56), (84, 112), (112, 112), (140, 70)]
images = [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
          for i in range(args.prompts)]
problems = [f"How many shapes are in image {i}? Output the final answer in <answer> </answer> tags."
            for i in range(args.prompts)]
batch = vlm.encode_prompts(tokenizer, image_processor, problems, images)
expected_tokens = args.prompts * args.n * args.max_new_tokens


def timed(engine, generate):
    """Median seconds of `repeats` batches after one warm-up; every batch must yield exactly expected_tokens."""
    seconds = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        completions = generate()
        elapsed = time.perf_counter() - start
        produced = sum(len(ids) for ids in completions)
        if produced != expected_tokens:
            sys.exit(f"a {engine} batch produced {produced} tokens, expected {expected_tokens}: the comparison is off")
        if i:
            seconds.append(elapsed)
    return statistics.median(seconds)


work_dir = tempfile.mkdtemp(prefix="vllm_bench_")
server = None
if args.url is None:
    if not os.path.exists(os.path.join(ROOT, ".venv-vllm", "bin", "vllm")):
        sys.exit(".venv-vllm is missing: run `bash scripts/setup_vllm_cpu.sh` first, or pass --url")
    model_dir = os.path.join(work_dir, "model")
    vlm.save_for_vllm(model, tokenizer, image_processor, model_dir)
    print(f"starting vllm serve (about a minute; log {work_dir}/server.log)", file=sys.stderr)
    server, url = vllm_cpu_server.start_cpu_server(model_dir, os.path.join(work_dir, "server.log"))
else:
    url = args.url
try:
    client = vlm.VLLMClient(url, image_processor, timeout=600)
    client.check_health()
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)
    # Both engines generate exactly max_new_tokens: vLLM ignores EOS, vlm.generate holds it back.
    vllm_s = timed("vLLM", lambda: client.generate(problems, images, ignore_eos=True, **sampling))
    hf_s = timed("HF", lambda: vlm.generate(model, tokenizer, batch, min_new_tokens=args.max_new_tokens, **sampling))

    write_s, reload_s = [], []
    weights_dir = os.path.join(work_dir, "weights")
    for _ in range(args.repeats):
        start = time.perf_counter()
        vlm.write_weights(model.state_dict(), weights_dir)
        middle = time.perf_counter()
        client.reload_weights(weights_dir)
        write_s.append(middle - start)
        reload_s.append(time.perf_counter() - middle)
finally:
    if server is not None:
        vllm_cpu_server.stop_server(server)
shutil.rmtree(work_dir)  # reached only on success: after a failure it keeps the server log

n_params = sum(p.numel() for p in model.parameters())
results = {
    "model": args.model, "parameters": n_params, "prompts": args.prompts, "n": args.n,
    "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "hf_threads": args.hf_threads,
    "tokens_per_batch": expected_tokens,
    "vllm_seconds": vllm_s, "hf_seconds": hf_s,
    "vllm_tokens_per_s": expected_tokens / vllm_s, "hf_tokens_per_s": expected_tokens / hf_s,
    "sync_write_seconds": statistics.median(write_s), "sync_reload_seconds": statistics.median(reload_s),
}
print(f"\n{args.prompts} prompts x {args.n} completions x {args.max_new_tokens} tokens = {expected_tokens} tokens "
      f"per batch, model {args.model} ({n_params / 1e6:.1f}M parameters), median of {args.repeats}\n")
print("| engine | seconds per batch | tokens/s |")
print("|---|---|---|")
print(f"| vLLM server (vllm-cpu, 1 worker core) | {vllm_s:.2f} | {results['vllm_tokens_per_s']:,.0f} |")
print(f"| HF, vlm.generate ({args.hf_threads} thread{'s' if args.hf_threads > 1 else ''}) | {hf_s:.2f} "
      f"| {results['hf_tokens_per_s']:,.0f} |")
print(f"\nweight sync: write_weights {results['sync_write_seconds'] * 1e3:.0f} ms + reload_weights "
      f"{results['sync_reload_seconds'] * 1e3:.0f} ms (reload, encoder and prefix cache resets)")
if args.out:
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
