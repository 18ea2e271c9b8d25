"""
Our GRPO step (train_grpo.py) against TRL's GRPOTrainer, side by side on this machine (issue 8).

    python prepare_data.py && python benchmarks/grpo_vs_trl.py
    python benchmarks/grpo_vs_trl.py --reps=7 --init_from=out/cold_start    # another weights folder
    python benchmarks/grpo_vs_trl.py --rev=HEAD~1 --no_scaling               # also our loop at another commit

Both sides get the same saved weights folder, the same synthetic prompts and images in the same order (the
schedule train_grpo.py draws for a uniform mixture), G completions per prompt, the same batch, every completion
exactly --length tokens (EOS held back on both sides), beta > 0 with a reference model, mu = 1, one micro-batch
per step, AdamW with the same learning rate and schedule, fp32, no gradient checkpointing, a frozen vision tower.
The GRPO settings are train_grpo.py's defaults; trl_config() says how each maps onto TRL's, and why.
Each repetition runs each side in a fresh process (the order alternates): warm-up steps, then timed steps. Printed:
the median over repetitions of samples/s and tokens/s over the timed steps, and of each process's peak RSS
(which includes the Python libraries each side imports), ratios to TRL as the median of each repetition's ratio;
then our step's time split, and how our step time grows with G and with the completion length. Other work on the
machine moves the figures (token-by-token decoding suffers most): compare runs of one invocation only.

TRL runs in its own venv, .venv-trl, built on first use from benchmarks/requirements-trl.txt (~2 min) and reused
while that file is unchanged. Remaining differences, inherent to TRL: its training forward also computes each
token's entropy (for its metrics), and it builds its prompts with Qwen2VLProcessor (checked here to give the
same tokens and pixels as vlm.encode_prompts).
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRL_VENV = os.path.join(ROOT, ".venv-trl")
TRL_REQUIREMENTS = os.path.join(ROOT, "benchmarks", "requirements-trl.txt")
# Other sessions may share these cores: without passive waiting, OpenMP's spinning threads slow torch ~20x.
CHILD_ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                 TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--reps", type=int, default=5, help="repetitions, each a fresh process per side (default 5)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them, >= 1 (default 2)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (default 2)")
    p.add_argument("--G", type=int, default=6, help="completions per prompt (default 6)")
    p.add_argument("--length", type=int, default=64, help="tokens per completion, EOS held back (default 64)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient, > 0: a reference model (default 0.04)")
    p.add_argument("--init_from", default="tiny",
                   help='"tiny" (saved once to OUT/model) or a save_pretrained folder, e.g. out/cold_start')
    p.add_argument("--data_dir", default=os.path.join(ROOT, "data"), help="prepare_data.py output (default data/)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "bench"),
                   help="work folder and report (default out/bench)")
    p.add_argument("--rev", action="append", default=[],
                   help="also run train_grpo.py as of this git revision (repeatable; it must know ignore_eos)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS for both sides (default 1, train_grpo.py's own default; 0: one per core)")
    p.add_argument("--no_scaling", dest="scaling", action="store_false", help="skip the G / length scaling runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run TRL's side from this spec file
    args = p.parse_args()
    if args.beta <= 0:
        p.error("--beta must be > 0: the benchmark includes the reference model")
    # a step is timed from the end of the one before, so at least one warm-up step
    if min(args.reps, args.steps, args.prompts, args.length, args.warmup) < 1 or args.G < 2 or args.threads < 0:
        p.error("--reps, --steps, --warmup, --prompts, --length must be >= 1, --G >= 2, --threads >= 0")
    return args


# ----------------------------------------------------------------------------------------------------------
# setup: TRL's venv, the weights folder, the settings both sides run

def ensure_trl_venv():
    """.venv-trl with benchmarks/requirements-trl.txt installed; rebuilt only when that file changes."""
    with open(TRL_REQUIREMENTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(TRL_VENV, "requirements.sha256")
    python = os.path.join(TRL_VENV, "bin", "python")
    if os.path.isfile(stamp) and open(stamp).read() == digest and os.path.isfile(python):
        return python
    print(f"setting up {TRL_VENV} from {TRL_REQUIREMENTS} (a few minutes, once)", flush=True)
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", TRL_REQUIREMENTS], check=True)
    with open(stamp, "w") as f:
        f.write(digest)
    return python


def weights_folder(init_from, out):
    if init_from != "tiny":
        if not os.path.isfile(os.path.join(init_from, "config.json")):
            raise SystemExit(f"error: --init_from {init_from} is not a save_pretrained folder (no config.json)")
        return os.path.abspath(init_from)
    import vlm
    folder = os.path.join(out, "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        vlm.save_policy(*vlm.load_policy("tiny"), folder)
    return folder


def grpo_settings(args):
    """train_grpo.py settings both sides run: its GRPO defaults, with what the benchmark fixes."""
    import train_grpo
    defaults = train_grpo.parse_config([])
    keep = ["temperature", "epsilon_low", "epsilon_high", "scale_rewards", "loss_type", "learning_rate",
            "weight_decay", "warmup_ratio", "grad_clip", "seed", "reward_mode", "reward_weights",
            "reward_gate_on_format", "reward_format_mode", "reward_iou_threshold"]
    settings = {k: defaults[k] for k in keep}
    settings.update(prompts_per_step=args.prompts, num_generations=args.G, max_completion_length=args.length,
                    beta=args.beta, num_iterations=1, micro_batch_size=args.prompts * args.G, ignore_eos=True,
                    freeze_vision=True, mixture="uniform", sampling="with_replacement")
    return settings


def trl_config(settings, steps, output_dir):
    """GRPOConfig doing what train_grpo.py does with `settings` (checked against TRL 1.16's GRPOTrainer source)."""
    loss_type = {"token": "bnpo",  # mean over the micro-batch's tokens; one micro-batch per step on both sides
                 "sequence": "grpo", "dr_grpo": "dr_grpo"}[settings["loss_type"]]
    length = settings["max_completion_length"]
    return dict(
        output_dir=output_dir, seed=settings["seed"], max_steps=steps, use_cpu=True,
        # a step: prompts x G completions generated at once, one forward/backward, one optimizer update
        per_device_train_batch_size=settings["prompts_per_step"] * settings["num_generations"],
        gradient_accumulation_steps=1, num_generations=settings["num_generations"],
        num_iterations=settings["num_iterations"], shuffle_dataset=False,  # the dataset is already in schedule order
        # objective: clipped ratio (never binds at mu = 1), k3 KL to the reference, advantages over the group
        # (r - mean) / (unbiased std + 1e-4), as group_advantages
        loss_type=loss_type, beta=settings["beta"], epsilon=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"], scale_rewards="group" if settings["scale_rewards"] else "none",
        # sampling: plain softmax at the temperature; EOS held back so every completion has `length` tokens
        # (TRL already suppresses the image placeholder token, as vlm.generate does)
        max_completion_length=length, temperature=settings["temperature"], top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": length},
        # optimizer: torch AdamW, linear warm-up over the same fraction of steps, then linear decay, clipping
        optim="adamw_torch", learning_rate=settings["learning_rate"], weight_decay=settings["weight_decay"],
        lr_scheduler_type="linear", warmup_steps=settings["warmup_ratio"], max_grad_norm=settings["grad_clip"],
        # TRL defaults that train_grpo.py does not do: gradient checkpointing and bf16 (ours: fp32 on CPU)
        gradient_checkpointing=False, bf16=False,
        # no logging, saving or progress output inside the timed loop
        logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )


def schedule_records(settings, data_dir, steps):
    """(domain, row) of every prompt in order: the schedule train_grpo.py draws for these settings."""
    import train_grpo
    import vlm
    manifest = vlm.load_manifest(data_dir)
    domains = train_grpo.training_domains(manifest)
    weights = train_grpo.resolve_mixture(settings["mixture"], "", domains)
    sizes = {d: len(train_grpo.load_train_split(data_dir, manifest, d)) for d in weights}
    schedule = train_grpo.build_schedule(weights, sizes, settings["prompts_per_step"], steps, settings["sampling"],
                                         settings["seed"])
    return [pick for step in schedule for pick in step]


# ----------------------------------------------------------------------------------------------------------
# one run of one side, in a fresh process

def run_process(argv, log_path, cwd=ROOT):
    """Run to completion with output to log_path; returns the process's peak RSS in MiB."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: {' '.join(argv[:2])} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def run_ours(code_dir, settings, folder, data_dir, warmup, steps, work):
    """train_grpo.py from code_dir; the timed steps' times and split come from its metrics.jsonl."""
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    argv = [sys.executable, os.path.join(code_dir, "train_grpo.py"), f"--init_from={folder}",
            f"--data_dir={data_dir}", f"--out_dir={work}/run", f"--max_steps={warmup + steps}",
            f"--checkpoint_every={10 ** 6}", "--log_samples_every=0"]
    argv += [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()]
    peak = run_process(argv, os.path.join(work, "log.txt"))
    with open(os.path.join(work, "run", "metrics.jsonl")) as f:
        timed = [json.loads(line) for line in f][warmup:]
    n = settings["prompts_per_step"] * settings["num_generations"]
    return {"step_s": [m["t_step"] for m in timed], "tokens": [m["completion_length"] * n for m in timed],
            "samples": [n] * len(timed), "peak_mib": peak,
            "split": {k: statistics.mean(m[k] for m in timed)
                      for k in ("t_generate", "t_reward", "t_ref_old", "t_forward_backward", "t_optimizer", "t_step")}}


def run_trl(python, settings, folder, data_dir, warmup, steps, work):
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    spec = {"settings": settings, "model": folder, "data_dir": data_dir, "steps": warmup + steps,
            "records": schedule_records(settings, data_dir, warmup + steps), "out": work}
    with open(os.path.join(work, "spec.json"), "w") as f:
        json.dump(spec, f)
    peak = run_process([python, os.path.abspath(__file__), f"--worker={work}/spec.json"],
                       os.path.join(work, "log.txt"))
    with open(os.path.join(work, "result.json")) as f:
        result = json.load(f)
    ends, lengths = result["step_ends"], result["lengths"]
    if len(ends) != warmup + steps or len(lengths) != warmup + steps:
        raise SystemExit(f"error: TRL ran {len(ends)} steps and scored {len(lengths)} batches, expected "
                         f"{warmup + steps}; see {work}/log.txt")
    return {"step_s": [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])],
            "tokens": [sum(x) for x in lengths[warmup:]], "samples": [len(x) for x in lengths[warmup:]],
            "peak_mib": peak}


def trl_worker(spec_path):
    """TRL's side, inside .venv-trl: GRPOTrainer on the spec's records, step end times and token counts out."""
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from datasets import Dataset
    from transformers import Qwen2VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import train_grpo
    import vlm

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """transformers 5 type-checks a video processor even when it is None, and every video processor needs
        torchvision, which has no CPU build here. Images never touch it."""
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    settings = spec["settings"]
    model, tokenizer, image_processor = vlm.load_policy(spec["model"])
    model.model.visual.requires_grad_(False)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          video_processor=None, chat_template=tokenizer.chat_template)
    manifest = vlm.load_manifest(spec["data_dir"])
    datasets = {d: train_grpo.load_train_split(spec["data_dir"], manifest, d) for d in {d for d, _ in spec["records"]}}
    rows = [datasets[d][row] for d, row in spec["records"]]
    check_same_prompt(processor, tokenizer, image_processor, rows[0])
    train = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "image": r["image"],
                                "solution": r["solution"], "domain": r["domain"], "meta": r["meta"]} for r in rows])

    lengths = []  # completion lengths of every scored batch

    def reward(completions, completion_ids, solution, domain, meta, **_):
        lengths.append([len(ids) for ids in completion_ids])
        records = [(None, None, s, d, json.loads(m)) for s, d, m in zip(solution, domain, meta)]
        scores = train_grpo.score_completions([c[0]["content"] for c in completions], records,
                                              train_grpo.scoring_options(**train_grpo.reward_settings(settings)))
        return [s["total"] for s in scores]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    config = GRPOConfig(**trl_config(settings, spec["steps"], os.path.join(spec["out"], "trl")))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=train,
                          processing_class=processor, callbacks=[clock])
    assert trainer.ref_model is not None and torch.is_grad_enabled()
    trainer.train()
    with open(os.path.join(spec["out"], "result.json"), "w") as f:
        json.dump({"step_ends": clock.ends, "lengths": lengths}, f)


def check_same_prompt(processor, tokenizer, image_processor, record):
    """TRL's prompt (Qwen2VLProcessor's chat template) must be token for token and pixel for pixel ours."""
    import torch
    import vlm
    messages = [{"role": "user", "content": [{"type": "image", "image": record["image"]},
                                             {"type": "text", "text": record["problem"]}]}]
    theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ours = vlm.encode_prompts(tokenizer, image_processor, [record["problem"]], [record["image"]])
    for key in ("input_ids", "pixel_values", "image_grid_thw"):
        if not torch.equal(torch.as_tensor(theirs[key]), ours[key]):
            raise SystemExit(f"error: TRL's prompt differs from ours in {key} for record {record['id']}")


# ----------------------------------------------------------------------------------------------------------
# the comparison, our time split, our scaling

def throughput(run):
    seconds = sum(run["step_s"])
    return {"samples_per_s": sum(run["samples"]) / seconds, "tokens_per_s": sum(run["tokens"]) / seconds,
            "peak_mib": run["peak_mib"]}


def extract_revision(rev, out):
    """train_grpo.py and its modules as of a git revision, in OUT/rev-<sha>."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"error: --rev {rev}: {sha.stderr.strip()}")
    folder = os.path.join(out, f"rev-{sha.stdout.strip()}")
    if not os.path.isfile(os.path.join(folder, "train_grpo.py")):
        os.makedirs(folder, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        tar_path = folder + ".tar"
        with open(tar_path, "wb") as f:
            f.write(archive)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")
        os.remove(tar_path)
    if "ignore_eos" not in open(os.path.join(folder, "train_grpo.py")).read():
        raise SystemExit(f"error: --rev {rev}: its train_grpo.py has no ignore_eos setting, so its completions "
                         "could stop early; pick a later revision")
    return folder


def compare(args, settings, folder, trl_python):
    sides = [("ours", ROOT)] + [(f"ours@{r}", extract_revision(r, args.out)) for r in args.rev] + [("TRL", None)]
    results = {name: [] for name, _ in sides}
    splits = []
    from tqdm import tqdm
    bar = tqdm(total=args.reps * len(sides), desc="runs", dynamic_ncols=True)
    for rep in range(args.reps):
        shift = rep % len(sides)  # alternate who goes first, so slow drift of the machine hits every side
        for name, code_dir in sides[shift:] + sides[:shift]:
            bar.set_postfix(rep=rep + 1, side=name)
            work = os.path.join(args.out, "runs", f"{name.replace('@', '-')}-{rep}")
            if code_dir is None:
                run = run_trl(trl_python, settings, folder, args.data_dir, args.warmup, args.steps, work)
            else:
                run = run_ours(code_dir, settings, folder, args.data_dir, args.warmup, args.steps, work)
                if name == "ours":
                    splits.append(run["split"])
            expected = settings["max_completion_length"]
            if any(t != s * expected for t, s in zip(run["tokens"], run["samples"])):
                raise SystemExit(f"error: {name} generated completions shorter than {expected} tokens ({work})")
            results[name].append(throughput(run))
            bar.update()
    bar.close()
    return results, splits


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def comparison_table(results):
    """Medians over repetitions; a ratio is the median of each repetition's ratio to TRL's run of the same
    repetition (run minutes apart, so load from elsewhere on the machine cancels better than in a ratio of medians)."""
    trl = results["TRL"]
    lines = ["| side | samples/s | tokens/s | peak RSS (MiB) | samples/s vs TRL | peak RSS vs TRL | samples/s range |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        m = {k: median_of(runs, k) for k in ("samples_per_s", "tokens_per_s", "peak_mib")}
        speed = statistics.median(r["samples_per_s"] / t["samples_per_s"] for r, t in zip(runs, trl))
        memory = statistics.median(r["peak_mib"] / t["peak_mib"] for r, t in zip(runs, trl))
        low, high = min(r["samples_per_s"] for r in runs), max(r["samples_per_s"] for r in runs)
        lines.append(f"| {name} | {m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['peak_mib']:.0f} | "
                     f"{speed:.2f}x | {memory:.2f}x | {low:.1f}-{high:.1f} |")
    return "\n".join(lines)


def split_table(splits):
    names = [("t_generate", "generation (with its prompts' encoding)"),
             ("t_ref_old", "micro-batch inputs, reference (and old) log-probs"),
             ("t_forward_backward", "policy forward + backward"), ("t_optimizer", "optimizer"),
             ("t_reward", "rewards and advantages")]
    for s in splits:
        s["other"] = s["t_step"] - sum(s[key] for key, _ in names)
    step = statistics.median(s["t_step"] for s in splits)
    lines = ["| part of our step | ms | share |", "|---|---|---|"]
    for key, label in names + [("other", "other (data loading, metrics)"), ("t_step", "whole step")]:
        seconds = statistics.median(s[key] for s in splits)
        lines.append(f"| {label} | {seconds * 1000:.0f} | {seconds / step:.0%} |")
    return "\n".join(lines)


def scaling_table(args, settings, folder):
    """Our median step time at G x1, x2, x4 and length x1, x2, x4 (one fresh process each)."""
    from tqdm import tqdm
    cases = [("G", f, dict(num_generations=args.G * f)) for f in (1, 2, 4)] + \
            [("length", f, dict(max_completion_length=args.length * f)) for f in (2, 4)]
    times = {}
    for what, factor, change in tqdm(cases, desc="scaling", dynamic_ncols=True):
        s = dict(settings, **change)
        s["micro_batch_size"] = s["prompts_per_step"] * s["num_generations"]
        run = run_ours(ROOT, s, folder, args.data_dir, args.warmup, args.steps,
                       os.path.join(args.out, "runs", f"scaling-{what}-{factor}"))
        times[(what, factor)] = statistics.median(run["step_s"])
    base = times[("G", 1)]
    lines = ["| G | tokens per completion | step (ms) | vs 1x | completions x tokens vs 1x |", "|---|---|---|---|---|"]
    for (what, factor), t in [(("G", 1), base)] + [(k, v) for k, v in times.items() if k != ("G", 1)]:
        g = args.G * factor if what == "G" else args.G
        length = args.length * factor if what == "length" else args.length
        lines.append(f"| {g} | {length} | {t * 1000:.0f} | {t / base:.2f}x | {factor}x |")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.worker:
        return trl_worker(args.worker)
    if not os.path.isfile(os.path.join(args.data_dir, "manifest.json")):
        raise SystemExit(f"error: {args.data_dir}/manifest.json not found: run `python prepare_data.py` first")
    # set for both sides either way: train_grpo.py would otherwise default to one thread and TRL to one per core
    CHILD_ENV["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
    args.out = os.path.abspath(args.out)
    args.data_dir = os.path.abspath(args.data_dir)
    os.makedirs(args.out, exist_ok=True)
    trl_python = ensure_trl_venv()
    folder = weights_folder(args.init_from, args.out)
    settings = grpo_settings(args)
    results, splits = compare(args, settings, folder, trl_python)
    n = args.prompts * args.G
    report = [f"# GRPO step: ours vs TRL {time.strftime('%Y-%m-%d')}",
              f"\n{args.prompts} prompts x G={args.G} = {n} completions of {args.length} tokens per step, beta "
              f"{args.beta}, mu 1, weights {folder}; median of {args.reps} repetitions (fresh process per side, "
              f"{args.warmup} warm-up + {args.steps} timed steps); {os.cpu_count()} CPU cores, torch threads: "
              f"{args.threads or 'default'}.\n", comparison_table(results),
              "\nOur step, median time split:\n", split_table(splits)]
    print("\n".join(report), flush=True)
    if args.scaling:
        scaling = scaling_table(args, settings, folder)
        report += ["\nOur step time as G and the completion length grow:\n", scaling]
        print("\nOur step time as G and the completion length grow:\n\n" + scaling)
    with open(os.path.join(args.out, "grpo_vs_trl.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(args.out, "grpo_vs_trl.json"), "w") as f:
        json.dump({"args": vars(args), "settings": settings, "results": results, "our_splits": splits}, f, indent=1)
    print(f"\nwritten: {args.out}/grpo_vs_trl.md, grpo_vs_trl.json")


if __name__ == "__main__":
    main()
