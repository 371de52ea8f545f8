"""Train the bench LM: a small Llama (hidden 256, 4 blocks, FFN 688, ~4 M parameters) and its byte-level
BPE tokenizer (4,096 tokens), on Tiny Shakespeare (first 90 %) plus the train splits of the commonsense
tasks (BoolQ, ARC-Easy, ARC-Challenge, written as lm-evaluation-harness prompts them, followed by the correct
answer: ``Question: …\\nAnswer: <option>``, BoolQ ``Question: …?\\nAnswer: yes|no``).
WikiText-2 (the perplexity test set) is never used for training.

Saved with ``save_pretrained`` (safetensors) + the tokenizer into ``--out`` (default
``$INFERNO_BENCH_LM`` or ``~/.cache/inferno/bench_lm``); if a model is already there, training is
skipped and only the held-out perplexity (last 10 % of Tiny Shakespeare) is printed.

    python scripts/train_bench_lm.py                 # ~9 min on 2 quiet CPU cores (585 steps, 2.4 M tokens)
    python scripts/train_bench_lm.py --force --steps 585 --threads 1 --out outputs/bench_lm

The schedule is a fixed number of optimizer steps (``--steps``; warm-up then cosine by step), whatever the wall
time, so two trainings differ only by floating-point summation order (thread count). ``training.json`` records
the figures and the SHA-256 of ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from inferno.config import data_dir

DEFAULT_OUT = os.environ.get("INFERNO_BENCH_LM", str(Path.home() / ".cache" / "inferno" / "bench_lm"))
EOS = "<|endoftext|>"


def corpus(data: Path) -> tuple[list[str], str]:
    """(training documents, held-out Shakespeare text)."""
    from inferno.tasks.commonsense import harness_item, load_examples

    text = (data / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    cut = text.index("\n\n", cut) if "\n\n" in text[cut:] else cut
    train_docs = [p for p in text[:cut].split("\n\n") if p.strip()]
    for task, prompt in (("boolq", "boolq"), ("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        f = data / "commonsense" / task / "train.json"
        if f.is_file():  # as lm-evaluation-harness prompts the task (BoolQ: "...?\nAnswer: yes|no"), correct answer
            items = [harness_item(e, prompt) for e in load_examples(f)]
            train_docs += [it.context + it.continuation(it.gold) for it in items]
    return train_docs, text[cut:]


def train_tokenizer(docs: list[str], vocab: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    model.eval()
    n = ids.numel() // seqlen
    x = ids[: n * seqlen].view(n, seqlen)
    total = 0.0
    for b in x.split(16):
        logits = model(input_ids=b).logits
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
    return math.exp(total / (n * (seqlen - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--data", default=data_dir())
    p.add_argument("--force", action="store_true", help="retrain even if a model is cached")
    p.add_argument("--steps", type=int, default=585, help="optimizer steps of --batch x --seqlen tokens (585: 2,396,160)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.data is None:
        sys.exit("error: --data: shared data folder not found (set INFERNO_DATA)")
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out, data = Path(a.out), Path(a.data)
    docs, held = corpus(data)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not a.force:
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        held_ids = torch.tensor(tok(held, add_special_tokens=False)["input_ids"])
        info = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
        print(f"cached bench LM at {out}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"held-out Shakespeare perplexity {perplexity(model, held_ids, a.seqlen):.2f}; training info {info}")
        return

    torch.manual_seed(a.seed)
    t0 = time.time()
    tok = train_tokenizer(docs, a.vocab)
    stream = tok(f"\n\n{EOS}".join(docs), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(stream, dtype=torch.long)
    held_ids = torch.tensor(tok(held, add_special_tokens=False)["input_ids"])
    print(f"tokenizer: {len(tok)} tokens in {time.time() - t0:.1f}s; training stream {ids.numel():,} tokens, "
          f"held-out {held_ids.numel():,}")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=max(512, a.seqlen),
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )
    model = AutoModelForCausalLM.from_config(config)
    nparams = sum(p.numel() for p in model.parameters())
    if a.steps < 1:
        sys.exit(f"error: --steps must be a positive integer, got {a.steps}")
    steps = a.steps
    print(f"model: Llama hidden {a.hidden}, {a.layers} blocks, FFN {a.ffn}: {nparams:,} parameters; {steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:
        p = step / steps  # by step only: the same schedule on any machine
        return a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    g = torch.Generator().manual_seed(a.seed)
    t_train, seen, step = time.time(), 0, 0
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        starts = torch.randint(0, ids.numel() - a.seqlen - 1, (a.batch,), generator=g)
        x = torch.stack([ids[s : s + a.seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        if step % 50 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.3f} tokens {seen:,} {time.time() - t_train:.0f}s", flush=True)
    train_s = time.time() - t_train
    model.eval()
    ppl = perplexity(model, held_ids, a.seqlen)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    info = {"parameters": nparams, "train_tokens": seen, "steps": step, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "train_seconds": round(train_s, 1), "final_loss": round(loss.item(), 4),
            "heldout_shakespeare_ppl": round(ppl, 3), "heldout_tokens": held_ids.numel(), "seqlen": a.seqlen,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model_safetensors_sha256": sha}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    print(f"saved to {out}: {nparams:,} parameters, {seen:,} tokens in {train_s:.0f}s; "
          f"held-out Shakespeare perplexity {ppl:.2f}")


if __name__ == "__main__":
    main()
