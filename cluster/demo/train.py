"""Train kvfleet's demo model pair on text every machine has: the Python standard library.

    python -m cluster.demo.train prepare --data DIR            # CPU: tokenizer + token files
    python -m cluster.demo.train train --data DIR --out DIR    # GPU: target, then its draft

`prepare` trains a byte-level BPE tokenizer (8k) on the stdlib's `*.py` files and writes them as
token ids, `</s>` after each file, holding out every 20th file (sorted by path) for validation.
The tokenizer puts `</s>` before each text it encodes with special tokens (as GPT-2 uses its
<|endoftext|>): a prompt then starts a file, as every training file starts after one.

`train` trains the target ("kvfleet-pycoder", a ~19M-parameter Llama) on next-token prediction,
then distils the draft (~2.8M parameters, same tokenizer) from it: loss = alpha * KL(target ||
draft) + (1 - alpha) * CE, with the target's soft distribution at temperature 1 (Hinton et al.
2015; DistillSpec, Zhou et al. 2023). It evaluates both on the held-out files beside a unigram
baseline, measures how often the draft's greedy token equals the target's (the quantity
speculative decoding lives on), and writes both as Hugging Face directories with a model card
recording data, hyperparameters and results.

The stdlib is only ~8M tokens, so the target sees it several times: residual dropout (training
only: the saved model is a plain Llama) and a cosine schedule short enough to end annealed before
the dev loss turns keep it from memorising (an earlier 22M target without dropout picked an early,
un-annealed checkpoint that its own 4.5M draft beat). Of two H100 runs with these shapes, of 1500
and 3000 target steps, the shipped pair is the 1500-step one (these defaults): its held-out loss is
higher (2.085 against 2.048), but its draft agrees with it on 75% of tokens against 69%, and the
3000-step target's greedy `def fibonacci(n):` ran on inside its docstring.

Deterministic given the seed and the step counts (up to the GPU's floating-point nondeterminism);
a time limit per phase stops early and the card records the steps actually run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 8192
EOS_ID = 1  # "</s>" in cluster.demo.model.train_tokenizer: separates files


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


TARGET = Shape(
    hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6, num_key_value_heads=2
)
# Clearly smaller than the target (a 4.5M draft once matched it): 3 layers, most of its weights in
# the embedding.
DRAFT = Shape(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1)


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 64
    target_steps: int = 1500  # ~6 passes over the training tokens
    draft_steps: int = 2000
    lr: float = 1e-3
    draft_lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.1
    alpha: float = 0.8  # weight of the KL term in the draft's loss
    dropout: float = 0.1  # on the target's attention and MLP outputs, while training
    seed: int = 0
    time_limit_s: float = 220.0  # per phase
    eval_tokens: int = 400_000
    eval_every: int = 100  # steps between dev-loss checks; the best checkpoint is kept (early stopping)
    dev_tokens: int = 65_536
    sample_tokens: int = 64  # of the target's greedy sample in its card


# ------------------------------------------------------------------ data (CPU)
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    return [f for f in sorted(STDLIB.rglob("*.py")) if "site-packages" not in f.parts]


def mark_file_start(tokenizer):
    """Make `</s>`, the file separator of the training data, the tokenizer's BOS: encoding with
    special tokens (transformers' default, and kvfleet's ingress) puts it before the text."""
    tokenizer.bos_token = tokenizer.eos_token
    tokenizer.add_bos_token = True
    return tokenizer


def prepare(data_dir: Path, vocab_size: int = VOCAB_SIZE) -> dict:
    from cluster.demo.model import train_tokenizer_on

    files = stdlib_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    val_idx = set(range(0, len(files), 20))
    train_texts = [t for i, t in enumerate(texts) if i not in val_idx]
    tokenizer = mark_file_start(train_tokenizer_on(train_texts, vocab_size))
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(data_dir / "tokenizer")

    def encode(idx):
        ids = []
        for i in idx:
            ids += [*tokenizer.encode(texts[i], add_special_tokens=False), EOS_ID]
        return np.asarray(ids, dtype=np.uint16)

    train = encode([i for i in range(len(files)) if i not in val_idx])
    val = encode(sorted(val_idx))
    np.save(data_dir / "train.npy", train)
    np.save(data_dir / "val.npy", val)
    digest = hashlib.sha256()
    for f, t in zip(files, texts, strict=True):
        digest.update(str(f.relative_to(STDLIB)).encode() + t.encode())
    meta = {
        "source": f"Python {platform.python_version()} standard library, *.py outside site-packages",
        "files": len(files),
        "val_files_first": [str(files[i].relative_to(STDLIB)) for i in sorted(val_idx)][:5],
        "val_rule": "every 20th file in sorted path order",
        "bytes": sum(len(t.encode()) for t in texts),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "sha256": digest.hexdigest(),
        "vocab_size": vocab_size,
    }
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------ training (GPU)
def _batches(tokens, seq_len, batch_size, seed, device):
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx].to(device, non_blocking=True)
        yield chunk[:, :-1], chunk[:, 1:]


def _model(shape: Shape, seed: int, device):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=EOS_ID,  # see mark_file_start
        eos_token_id=EOS_ID,
        pad_token_id=2,
        head_dim=64,
        **asdict(shape),
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(device)


def add_residual_dropout(model, p: float) -> None:
    """Dropout on every attention and MLP output while the model trains (transformers' Llama has
    none); forward hooks, so the saved checkpoint stays a plain Llama."""
    import torch.nn.functional as F

    def hook(module, args, output):
        if not module.training or p == 0:
            return output
        if isinstance(output, tuple):  # attention: (output, weights)
            return (F.dropout(output[0], p, True), *output[1:])
        return F.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def _optimizer(model, lr, weight_decay, warmup, steps):
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=torch.cuda.is_available(),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    return opt, sched


def split_held_out(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The held-out files alternately into dev (picks checkpoints) and test (reported): files of
    every kind land in both (a cut of the token stream in halves put the stdlib's test/ package,
    full of odd literals, on one side)."""
    bounds = np.flatnonzero(tokens == EOS_ID) + 1
    files = np.split(tokens, bounds[:-1]) if bounds.size else [tokens]
    return np.concatenate(files[0::2]), np.concatenate(files[1::2] or files[:1])


def dev_loss(model, tokens, seq_len: int, device, max_tokens: int) -> float:
    """Mean next-token cross-entropy over the first `max_tokens` of `tokens`."""
    import torch
    import torch.nn.functional as F

    windows = _windows(tokens, seq_len, max_tokens)
    x = torch.tensor(np.stack([w[0] for w in windows]).astype(np.int64), device=device)
    y = torch.tensor(np.stack([w[1] for w in windows]).astype(np.int64), device=device)
    total = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(windows), 32):
            logits = model(x[i : i + 32]).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 32].flatten(), reduction="sum").item()
    return total / y.numel()


def _run(phase: str, model, steps: int, cfg: TrainConfig, loss_fn, lr: float, train, dev, device, log) -> dict:
    """Train for `steps` (or the time limit), checking the dev loss every `eval_every` steps and
    ending with the weights of the best check (early stopping: a 19M model overfits 8M tokens)."""
    import torch

    opt, sched = _optimizer(model, lr, cfg.weight_decay, cfg.warmup, steps)
    batches = _batches(train, cfg.seq_len, cfg.batch_size, cfg.seed + (phase == "draft"), device)
    model.train()
    start = time.time()
    done = 0
    best = (float("inf"), 0, None)  # (dev loss, step, weights)
    for step in range(steps):
        x, y = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        out_of_time = time.time() - start > cfg.time_limit_s
        if done % cfg.eval_every == 0 or done == steps or out_of_time:
            model.eval()
            loss_dev = dev_loss(model, dev, cfg.seq_len, device, cfg.dev_tokens)
            model.train()
            if loss_dev < best[0]:
                best = (loss_dev, done, {k: v.detach().clone() for k, v in model.state_dict().items()})
            log(f"{phase} step {done}: train {loss.item():.3f}, dev {loss_dev:.3f} ({time.time() - start:.0f}s)")
        if out_of_time:
            log(f"{phase}: time limit reached after {done} steps")
            break
    model.load_state_dict(best[2])
    model.eval()
    return {
        "steps_run": done,
        "best_step": best[1],
        "best_dev_loss": round(best[0], 4),
        "seconds": round(time.time() - start, 1),
        "tokens": best[1] * cfg.batch_size * cfg.seq_len,
    }


def _windows(tokens, seq_len, max_tokens):
    n = min(tokens.size - 1, max_tokens) // seq_len
    return [
        (tokens[i * seq_len : (i + 1) * seq_len], tokens[i * seq_len + 1 : (i + 1) * seq_len + 1]) for i in range(n)
    ]


def evaluate(target, draft, train, val, seq_len: int, device, max_tokens: int = 400_000) -> dict:
    """Held-out cross-entropy (nats/token) of both models and of a unigram model fitted on the
    training tokens, and the fraction of positions where the draft's greedy token equals the
    target's."""
    import torch
    import torch.nn.functional as F

    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    windows = _windows(val, seq_len, max_tokens)
    tgt_loss = drf_loss = agree = total = 0.0
    unigram = 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(windows), 16):
            chunk = windows[i : i + 16]
            x = torch.tensor(np.stack([w[0] for w in chunk]).astype(np.int64), device=device)
            y = torch.tensor(np.stack([w[1] for w in chunk]).astype(np.int64), device=device)
            lt = target(x).logits.float()
            ld = draft(x).logits.float()
            tgt_loss += F.cross_entropy(lt.flatten(0, 1), y.flatten(), reduction="sum").item()
            drf_loss += F.cross_entropy(ld.flatten(0, 1), y.flatten(), reduction="sum").item()
            agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
            unigram += -logp[y.cpu().numpy()].sum()
            total += y.numel()
    return {
        "val_tokens": int(total),
        "target_val_loss": tgt_loss / total,
        "draft_val_loss": drf_loss / total,
        "unigram_val_loss": unigram / total,
        "greedy_agreement": agree / total,
    }


SAMPLE_PROMPT = "def fibonacci(n):"


def greedy_continuation(model, tokenizer, prompt: str, device, max_new_tokens: int = 64) -> str:
    """The model's greedy continuation of `prompt` (encoded with the file-start `</s>`) in float32
    (no TF32), up to the end of file."""
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig, log=print) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import PreTrainedTokenizerFast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    train_tokens = np.load(data_dir / "train.npy")
    dev_tokens, val_tokens = split_held_out(np.load(data_dir / "val.npy"))
    meta = json.loads((data_dir / "meta.json").read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir / "tokenizer")

    target = _model(TARGET, cfg.seed, device)
    add_residual_dropout(target, cfg.dropout)

    def lm_loss(x, y):
        return F.cross_entropy(target(x).logits.float().flatten(0, 1), y.flatten())

    target_run = _run("target", target, cfg.target_steps, cfg, lm_loss, cfg.lr, train_tokens, dev_tokens, device, log)

    draft = _model(DRAFT, cfg.seed + 1, device)
    target.requires_grad_(False)

    def distill_loss(x, y):
        with torch.no_grad():
            teacher = F.log_softmax(target(x).logits.float(), -1)
        student = F.log_softmax(draft(x).logits.float(), -1)
        kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        ce = F.nll_loss(student.flatten(0, 1), y.flatten())
        return cfg.alpha * kl + (1 - cfg.alpha) * ce

    draft_run = _run(
        "draft", draft, cfg.draft_steps, cfg, distill_loss, cfg.draft_lr, train_tokens, dev_tokens, device, log
    )
    for model in (target, draft):  # measure the weights that ship: rounded to bfloat16
        model.to(torch.bfloat16).float()
    results = evaluate(target, draft, train_tokens, val_tokens, cfg.seq_len, device, cfg.eval_tokens)
    log(json.dumps(results))
    sample = greedy_continuation(target, tokenizer, SAMPLE_PROMPT, device, cfg.sample_tokens)
    log(f"{SAMPLE_PROMPT}{sample}")
    record = {
        "data": meta,
        "train_config": asdict(cfg),
        "target_run": target_run,
        "draft_run": draft_run,
        "results": results,
        "sample": {"prompt": SAMPLE_PROMPT, "greedy_continuation": sample},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    for name, model, shape, run in (
        ("kvfleet-pycoder", target, TARGET, target_run),
        ("kvfleet-pycoder-draft", draft, DRAFT, draft_run),
    ):
        path = out_dir / name
        model.to(torch.bfloat16).save_pretrained(path)
        tokenizer.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        (path / "README.md").write_text(_card(name, params, shape, run, record))
        (path / "training.json").write_text(json.dumps(record | {"model": name, "parameters": params}, indent=1))
    return record


def _card(name: str, params: int, shape: Shape, run: dict, record: dict) -> str:
    r, d, c = record["results"], record["data"], record["train_config"]
    is_target = name == "kvfleet-pycoder"
    lr = c["lr"] if is_target else c["draft_lr"]
    dropout = f"residual dropout {c['dropout']} (attention and MLP outputs), " if is_target else ""
    role = (
        "the target: trained from scratch on next-token prediction"
        if is_target
        else f"the draft for kvfleet-pycoder: distilled from it (loss = {c['alpha']} x KL(target || draft) + "
        f"{1 - c['alpha']:.1f} x cross-entropy, temperature 1)"
    )
    return f"""---
license: psf-2.0
library_name: transformers
tags: [code, python, kvfleet, speculative-decoding]
---
# {name}

A small Llama-architecture causal LM of Python code, shipped with kvfleet for its demo, its tests and
speculative decoding. It writes Python that looks like the standard library's; it knows nothing else.
Chat-free. This is {role}.

- Parameters: {params / 1e6:.1f}M ({shape.num_hidden_layers} layers, hidden {shape.hidden_size},
  MLP {shape.intermediate_size}, {shape.num_attention_heads} heads of 64, {shape.num_key_value_heads} KV heads,
  tied embeddings), stored in bfloat16.
- Tokenizer: byte-level BPE, {d["vocab_size"]} tokens, trained on the training files; `</s>` (id 1) separates files,
  and the tokenizer puts one before each text it encodes with special tokens (a prompt starts a file).
- Data: {d["source"]}: {d["files"]} files, {d["bytes"] / 1e6:.1f} MB, {d["train_tokens"]:,} training tokens and
  {d["val_tokens"]:,} held-out tokens ({d["val_rule"]}); sha256 of paths and contents {d["sha256"][:16]}...
- Training: the checkpoint of step {run["best_step"]} of {run["steps_run"]} run, the lowest loss on the dev files (every
  other held-out file; checked every {c["eval_every"]} steps), in batches of {c["batch_size"]} x {c["seq_len"]} tokens
  ({run["tokens"] / 1e6:.0f}M tokens to that step; {run["seconds"]:.0f} s in all on {record["device"]}); AdamW
  (betas 0.9/0.95, weight decay {c["weight_decay"]}), peak LR {lr}, {c["warmup"]} warm-up steps, cosine to 10%,
  {dropout}bf16 autocast, seed {c["seed"]}.
  Script: `python -m cluster.demo.train` in kvfleet.

## Held-out results ({r["val_tokens"]:,} tokens of the test files, never used to pick a checkpoint)

| model | cross-entropy (nats/token) |
| --- | --- |
| kvfleet-pycoder (target) | {r["target_val_loss"]:.3f} |
| kvfleet-pycoder-draft | {r["draft_val_loss"]:.3f} |
| unigram baseline (training-token frequencies) | {r["unigram_val_loss"]:.3f} |

Greedy agreement: the draft's most likely next token equals the target's at {r["greedy_agreement"]:.1%}
of held-out positions (teacher-forced).
{_sample_section(record) if is_target else ""}{_note(record)}"""


def _note(record: dict) -> str:
    return f"\n## Note\n\n{record['post_training']}\n" if record.get("post_training") else ""


def _sample_section(record: dict) -> str:
    sample = record["sample"]
    return f"""
## Greedy sample (float32, the prompt after the file-start `</s>`)

```python
{sample["prompt"]}{sample["greedy_continuation"]}
```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the tokenizer and write token files (CPU)")
    p.add_argument("--data", type=Path, required=True)
    t = sub.add_parser("train", help="train the target and distil the draft (GPU)")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    for field, value in asdict(TrainConfig()).items():
        t.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        print(json.dumps(prepare(args.data), indent=1))
    else:
        cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
        train(args.data, args.out, cfg, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
