"""Distil a small draft from the default model (SmolLM2-135M-Instruct) for speculative decoding.

    python -m cluster.demo.distill train --out runs/draft            # one GPU, a few minutes
    python -m cluster.demo.distill export runs/draft cluster/demo_models/smollm2-135m-draft

`train`, on-policy knowledge distillation: chat prompts are built from the topics and task templates
below (held-out prompts use topics never trained on); the target answers each one greedily and by
sampling at temperature 1; the draft learns the target's next-token distribution at every position of
those conversations (loss: KL(target || draft) at temperature 1, the target's logits computed on the fly).
So the draft imitates what the target says, where the target says it: the text speculative decoding
asks it to predict. It starts from the target's token embeddings projected on their top principal
directions (tied input/output embeddings). Held-out figures: KL, top-1 agreement (greedy acceptance
per token) and sum_v min(p, q) (the expected acceptance per token at temperature 1). Writes a Hugging
Face directory (config.json, model.safetensors in float32, training.json).

`export` writes the draft as one GGUF file (Q8_0 matrices, float32 norms; the target's tokenizer only
with --with-tokenizer: a draft is served without one) that kvfleet's GGUF reader serves: 16.8 MB
instead of 63 MB in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TOPICS = [
    "photosynthesis",
    "black holes",
    "the French Revolution",
    "machine learning",
    "volcanoes",
    "the water cycle",
    "climate change",
    "the human heart",
    "the stock market",
    "recursion in programming",
    "the Roman Empire",
    "honey bees",
    "electric cars",
    "the moon landing",
    "vaccines",
    "coffee",
    "the internet",
    "DNA",
    "earthquakes",
    "the Renaissance",
    "solar panels",
    "sleep",
    "chess",
    "the Great Wall of China",
    "gravity",
    "inflation",
    "rainbows",
    "the immune system",
    "jazz music",
    "sorting algorithms",
    "the Amazon rainforest",
    "plate tectonics",
    "bread baking",
    "the printing press",
    "quantum computers",
    "penguins",
    "the Olympic Games",
    "recycling",
    "meditation",
    "the Pythagorean theorem",
    "Shakespeare",
    "tides",
    "antibiotics",
    "the Industrial Revolution",
    "dinosaurs",
    "blockchains",
    "the speed of light",
    "democracy",
    "yoga",
    "the periodic table",
    "hurricanes",
    "public speaking",
    "time management",
    "the Silk Road",
    "wind turbines",
    "the human brain",
    "origami",
    "bacteria",
    "Python lists",
    "SQL joins",
    "the Eiffel Tower",
    "marathon training",
    "composting",
    "the Moon",
    "supply and demand",
    "the Mona Lisa",
    "glaciers",
    "the camera",
    "friendship",
    "budgeting",
]
HELD_OUT_TOPICS = [
    "octopuses",
    "the Byzantine Empire",
    "neural networks",
    "tea ceremonies",
    "Mars rovers",
    "compound interest",
    "coral reefs",
    "the violin",
    "hash tables",
    "desert ecosystems",
]
TEMPLATES = [
    "What is {t}?",
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "Give me three interesting facts about {t}.",
    "Why does {t} matter?",
    "Summarize the history of {t}.",
    "What are the pros and cons of {t}?",
    "Write a haiku about {t}.",
    "How would you teach {t} in one lesson?",
    "Tell me a short story involving {t}.",
    "What are common misconceptions about {t}?",
    "Write a tweet about {t}.",
    "Describe {t} in one paragraph.",
    "List five questions a student might ask about {t}.",
    "How does {t} work?",
    "Compare {t} with something from everyday life.",
]
EXTRA_PROMPTS = [
    "What is 17 times 23?",
    "Translate 'thank you very much' into French.",
    "Write a Python function that reverses a string.",
    "Hi! How are you today?",
    "Can you suggest a name for a black cat?",
    "What should I cook for dinner tonight?",
    "Write an email asking my manager for a day off.",
    "What is the capital of Japan?",
    "Give me a motivational quote.",
    "How do I make a cup of tea?",
    "Write a limerick about a programmer.",
    "What's the difference between weather and climate?",
]


def prompts(held_out: bool) -> list[str]:
    topics = HELD_OUT_TOPICS if held_out else TOPICS
    out = [tpl.format(t=t) for t in topics for tpl in TEMPLATES]
    return out if held_out else out + EXTRA_PROMPTS


# ---- models -------------------------------------------------------------------------------------


def draft_model(target, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    import transformers

    tc = target.config
    config = transformers.LlamaConfig(
        vocab_size=tc.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=tc.rms_norm_eps,
        rope_theta=tc.rope_parameters["rope_theta"] if getattr(tc, "rope_parameters", None) else tc.rope_theta,
        max_position_embeddings=tc.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
    )
    draft = transformers.LlamaForCausalLM(config).to(next(target.parameters()).device)
    # Start from the target's embeddings on their top `hidden` principal directions.
    emb = target.model.embed_tokens.weight.detach().float()
    _, _, v = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    proj = emb @ v[:hidden].T
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(proj / proj.pow(2).mean().sqrt() * 0.05)
    draft.tie_weights()
    return draft.float()


# ---- data ---------------------------------------------------------------------------------------


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


@torch.inference_mode()
def generate(
    target, tokenizer, questions: list[str], samples: int, max_new: int, batch: int, seed: int
) -> list[list[int]]:
    """Per question, one greedy answer and `samples - 1` sampled at temperature 1: prompt + answer ids."""
    device = next(target.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    jobs = [(q, i) for q in questions for i in range(samples)]
    out = []
    torch.manual_seed(seed)
    for greedy in (True, False):
        part = [q for q, i in jobs if (i == 0) == greedy]
        for lo in range(0, len(part), batch):
            ids = [chat_ids(tokenizer, q) for q in part[lo : lo + batch]]
            width = max(map(len, ids))
            x = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
            kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
            y = target.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad, **kw)
            for p, row in zip(ids, y[:, width:].tolist(), strict=True):
                if pad in row:  # the answer ends at its first end-of-turn (pad is <|im_end|>)
                    row = row[: row.index(pad) + 1]
                out.append(p + row)
            print(f"generated {len(out)}/{len(jobs)}", flush=True)
    return out


def batches(seqs: list[list[int]], batch: int, pad: int, rng: random.Random, device):
    """Random batches, right-padded; mask marks the positions whose next token is real."""
    order = list(range(len(seqs)))
    while True:
        rng.shuffle(order)
        for lo in range(0, len(order) - batch + 1, batch):
            rows = [seqs[i] for i in order[lo : lo + batch]]
            width = max(map(len, rows))
            x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * (len(r) - 1) + [0] * (width - len(r) + 1) for r in rows], device=device)
            yield x, mask.bool()


def kl_terms(t_logits, d_logits, mask):
    """Per real position: KL(target || draft), top-1 agreement and sum_v min(p, q)."""
    t = t_logits[mask].float()
    d = d_logits[mask].float()
    t_logp, d_logp = F.log_softmax(t, -1), F.log_softmax(d, -1)
    p = t_logp.exp()
    kl = (p * (t_logp - d_logp)).sum(-1)
    agree = (t.argmax(-1) == d.argmax(-1)).float()
    overlap = torch.minimum(p, d_logp.exp()).sum(-1)
    return kl, agree, overlap


@torch.no_grad()
def evaluate(target, draft, seqs, pad: int, batch: int = 32) -> dict:
    device = next(target.parameters()).device
    kls, agrees, overlaps = [], [], []
    for lo in range(0, len(seqs), batch):
        rows = seqs[lo : lo + batch]
        width = max(map(len, rows))
        x = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * (len(r) - 1) + [0] * (width - len(r) + 1) for r in rows], device=device).bool()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            t, d = target(x).logits, draft(x).logits
        kl, agree, overlap = kl_terms(t, d, mask)
        kls.append(kl)
        agrees.append(agree)
        overlaps.append(overlap)
    kl, agree, overlap = torch.cat(kls), torch.cat(agrees), torch.cat(overlaps)
    return {
        "positions": int(kl.numel()),
        "kl_nats": round(kl.mean().item(), 4),
        "top1_agreement": round(agree.mean().item(), 4),
        "expected_acceptance_t1": round(overlap.mean().item(), 4),
    }


# ---- train --------------------------------------------------------------------------------------


def cmd_train(args) -> None:
    from cluster.default_model import default_model_path, transformers_from_gguf
    from workers.models.tokenizer import load_tokenizer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    target_path = Path(args.target) if args.target else default_model_path()
    tokenizer = load_tokenizer(target_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2
    target = transformers_from_gguf(target_path, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    train_q, test_q = prompts(False), prompts(True)
    if args.limit:  # a smoke run
        train_q, test_q = train_q[: args.limit], test_q[: max(1, args.limit // 4)]
    train = generate(target, tokenizer, train_q, args.samples, args.max_new_tokens, args.gen_batch, args.seed)
    test = generate(target, tokenizer, test_q, 2, args.max_new_tokens, args.gen_batch, args.seed + 1)
    gen_s = time.perf_counter() - start
    print(f"data: {len(train)} training and {len(test)} held-out conversations ({gen_s:.0f}s)", flush=True)

    torch.manual_seed(args.seed)
    draft = draft_model(target, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate)
    n_params = sum(p.numel() for p in draft.parameters())
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int, progress: float) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    data = batches(train, args.batch, pad, random.Random(args.seed), device)
    tokens = step = 0
    train_start = time.perf_counter()
    while True:
        # progress: the larger of the step and time fractions (--max-train-s bounds a run's cost)
        elapsed = time.perf_counter() - train_start
        progress = max(step / args.steps, elapsed / args.max_train_s if args.max_train_s else 0.0)
        if progress >= 1.0:
            break
        x, mask = next(data)
        lr = lr_at(step, progress)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_logits = target(x).logits
            d_logits = draft(x).logits
        kl, _, _ = kl_terms(t_logits, d_logits, mask)
        loss = kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        tokens += int(mask.sum())
        if step % 100 == 0:
            print(f"step {step} KL {loss.item():.4f} lr {lr:.2e} ({elapsed:.0f}s)", flush=True)
        step += 1
    train_s = time.perf_counter() - train_start

    draft.eval()
    held_out = evaluate(target, draft, test, pad)
    print("held-out:", held_out, flush=True)
    out = Path(args.out)
    draft.save_pretrained(out)
    report = {
        "target": target_path.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": n_params,
        "architecture": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate")},
        "data": {
            "train_prompts": len(train_q),
            "held_out_prompts": len(test_q),
            "samples_per_prompt": args.samples,
            "held_out_samples_per_prompt": 2,
            "max_new_tokens": args.max_new_tokens,
            "train_conversations": len(train),
            "train_tokens": sum(map(len, train)),
            "held_out_conversations": len(test),
        },
        "training": {
            "steps": step,
            "batch": args.batch,
            "tokens_seen": tokens,
            "lr": args.lr,
            "seed": args.seed,
            "generate_s": round(gen_s, 1),
            "train_s": round(train_s, 1),
        },
        "held_out": held_out,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


# ---- export -------------------------------------------------------------------------------------


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's rotary row order (the inverse of workers.models.gguf.unpermute)."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def cmd_export(args) -> None:
    import gguf
    from safetensors.torch import load_file

    from cluster.default_model import default_model_path

    src = Path(args.src)
    cfg = json.loads((src / "config.json").read_text())
    weights = {k: v.float().numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    target = gguf.GGUFReader(str(Path(args.target) if args.target else default_model_path()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{out.name}.Q8_0.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(out.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float((cfg.get("rope_parameters") or cfg)["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, field in target.fields.items() if args.with_tokenizer else ():  # the target's tokenizer
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            value = field.contents()
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, value, vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, value, vtype)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, value in weights.items():
        if name == "lm_head.weight":
            continue  # tied
        if name in names:
            gname = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{layer_names[rest]}"
        if gname.endswith("attn_q.weight"):
            value = _permute(value, cfg["num_attention_heads"])
        elif gname.endswith("attn_k.weight"):
            value = _permute(value, cfg["num_key_value_heads"])
        if value.ndim == 2:
            w.add_tensor(
                gname,
                gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(gname, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if (src / "training.json").is_file():
        (out / "training.json").write_text((src / "training.json").read_text())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo.distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="generate on-policy data from the target and distil the draft (GPU)")
    t.add_argument("--out", required=True)
    t.add_argument("--target", help="the target GGUF (default: the installed SmolLM2-135M-Instruct)")
    t.add_argument("--device", default="auto")
    t.add_argument("--hidden", type=int, default=256)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--intermediate", type=int, default=768)
    t.add_argument("--samples", type=int, default=4, help="answers per training prompt: 1 greedy, the rest at T=1")
    t.add_argument("--max-new-tokens", type=int, default=192)
    t.add_argument("--gen-batch", type=int, default=512)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--max-train-s", type=float, default=0, help="stop training after this long (0: no limit)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=0, help="use only this many training prompts (a smoke run)")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write a trained draft as a Q8_0 GGUF with the target's tokenizer")
    e.add_argument("src", help="the directory `train` wrote")
    e.add_argument("out", help="the output directory (the file is named after it)")
    e.add_argument("--target", help="the target GGUF whose tokenizer is copied (default: the installed one)")
    e.add_argument(
        "--with-tokenizer",
        action="store_true",
        help="copy the target's tokenizer and chat template in (+1.7 MB; a draft is served without one)",
    )
    e.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
