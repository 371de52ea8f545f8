"""Peer benchmark: prune a saved HF Llama with llm-compressor's Wanda / SparseGPT (50 % unstructured, sequential
pipeline) on CPU and write the wall time, peak memory and achieved sparsity to a JSON file.

RUN THIS WITH THE PEER VENV'S PYTHON, never the project's: llm-compressor (``llmcompressor`` 0.14.x, which pins
its own transformers / compressed-tensors) is NOT a project dependency and must not be installed into the
project venv. The throwaway venv is made with

    python3 -m venv /work/peer/venv
    /work/peer/venv/bin/pip install torch==2.13.0                      # the CPU build; install torch FIRST
    echo 'torch==2.13.0' > /work/peer/constraints.txt
    /work/peer/venv/bin/pip install -c /work/peer/constraints.txt 'llmcompressor==0.14.*'

and the script is called (e.g. from scripts/bench_llm_prune.py, in a subprocess) as

    /work/peer/venv/bin/python scripts/peer_llmcompressor.py --method wanda --model DIR \
        --nsamples 32 --seqlen 256 --threads 2 [--calib CALIB.pt] [--batch-size 1] --out RESULT.json

``--model`` is a folder written by ``save_pretrained`` (float32 Llama). ``--calib`` is a ``torch.save``d
LongTensor ``(nsamples, seqlen)`` from the caller so both sides see the same tokens; without it the ids are
``torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))``, which is what the
project's benchmark draws. Everything runs offline (HF_HUB_OFFLINE=1): the calibration set is passed already
tokenized, and the tokenizer that ``oneshot`` insists on having is built in memory (a throwaway WordLevel one,
never used to tokenize anything).

Measured: ``oneshot_s`` (time.perf_counter around the ``oneshot`` call alone: it includes llm-compressor's
torch.fx tracing of the model into per-layer subgraphs, building the dataloader, the calibration + propagation
passes per decoder layer and the pruning); ``rss_loaded_mb``, the resident set right before ``oneshot`` (torch,
transformers and llm-compressor imported, model and calibration data in memory: the weights, which
transformers 5 memory-maps from the safetensors file, are first copied into ordinary memory so that they are
resident in this baseline rather than paged in during ``oneshot``); ``peak_rss_mb``, ru_maxrss of the process,
whose high-water mark is reset through /proc/self/clear_refs just before ``oneshot`` so that loading's
transient peak is not in it (``peak_above_loaded_mb`` = the difference: what pruning costs on top of the
loaded model); and the fraction of zeros of the decoder layers' linears (lm_head's too, which stays dense).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    p.add_argument("--model", required=True, help="folder with a saved HF Llama (float32)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=1,
                   help="calibration batch size handed to oneshot (llm-compressor's default and advice: 1)")
    p.add_argument("--calib", default=None, help="torch.save'd LongTensor (nsamples, seqlen) of token ids")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids when --calib is not given")
    p.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    return _status_mb("VmRSS")


def maxrss_mb() -> float:
    """Peak resident set of this process (VmHWM, MB). Not ``getrusage``'s ru_maxrss: Linux keeps a parent's
    ru_maxrss across fork + exec, so a child started by a big benchmark process would report the parent's peak."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM, which ru_maxrss reads for RUSAGE_SELF) to the current
    RSS, so that the peak measured afterwards belongs to what runs afterwards, not to loading (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (cpu_s / oneshot_s near the thread count: it had the
    cores to itself; far below: other processes were competing)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def tiny_tokenizer():
    """An in-memory fast tokenizer (nothing downloaded). oneshot requires a processor whenever a dataset is
    given; with an already tokenized Dataset and the default 'truncation' collator it is never called."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def materialize(model) -> None:
    """from_pretrained (transformers 5) memory-maps the safetensors file: the weights are paged in lazily as
    file-backed memory, so the RSS after loading would miss them and the peak would count them. Copy every
    parameter and buffer into ordinary (anonymous) memory, as a model built in the process has them."""
    import gc

    import torch

    copies = {}
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            if key not in copies:  # tied tensors stay tied
                copies[key] = t.data.clone()
            t.data = copies[key]
    del copies
    gc.collect()


def decoder_sparsity(model) -> dict:
    import torch

    zeros = total = 0
    per_layer = []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            z = int((mod.weight == 0).sum())
            zeros += z
            total += mod.weight.numel()
            per_layer.append(z / mod.weight.numel())
    head = model.get_output_embeddings().weight
    return {
        "decoder_linear_sparsity": zeros / total,
        "decoder_linear_sparsity_min": min(per_layer),
        "decoder_linear_sparsity_max": max(per_layer),
        "decoder_linears": len(per_layer),
        "lm_head_sparsity": float((head == 0).float().mean()),
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    # offline, and thread counts fixed before torch starts its pools
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark, also where a GPU exists

    import torch

    torch.set_num_threads(a.threads)
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    load_avg_start = os.getloadavg()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, device_map=None)
    model.eval()
    materialize(model)
    n_params = sum(p.numel() for p in model.parameters())

    if a.calib:
        ids = torch.load(a.calib, weights_only=True)
        if ids.shape != (a.nsamples, a.seqlen):
            sys.exit(f"--calib has shape {tuple(ids.shape)}, expected ({a.nsamples}, {a.seqlen})")
    else:
        ids = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen),
                            generator=torch.Generator().manual_seed(a.seed))
    ids = ids.long()
    calib = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    tokenizer = tiny_tokenizer()

    common = {"sparsity": a.sparsity, "mask_structure": "0:0", "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    if a.method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:  # llm-compressor's defaults, which are also the project's: 128-column blocks, 1 % dampening
        modifier = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)

    maxrss_before = maxrss_mb()  # includes loading's transient peak (mmapped file + the copy)
    peak_reset = reset_peak_rss()
    rss_loaded = rss_mb()
    c0, t0 = cpu_s(), time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=calib,
        recipe=[modifier],
        num_calibration_samples=a.nsamples,
        max_seq_length=a.seqlen,
        batch_size=a.batch_size,
        shuffle_calibration_samples=False,
        pipeline="sequential",  # what llm-compressor infers for these modifiers anyway
        output_dir=None,  # save nothing
    )
    oneshot_s = time.perf_counter() - t0
    oneshot_cpu_s = cpu_s() - c0
    peak = maxrss_mb()
    rss_after = rss_mb()

    result = {
        "peer": "llmcompressor",
        "method": a.method,
        "model": os.path.abspath(a.model),
        "parameters": n_params,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "sparsity_target": a.sparsity,
        "mask_structure": "0:0",
        "pipeline": "sequential",
        "calib": os.path.abspath(a.calib) if a.calib else f"randint seed {a.seed}",
        "oneshot_s": oneshot_s,
        "oneshot_cpu_s": oneshot_cpu_s,
        "rss_loaded_mb": rss_loaded,
        "maxrss_before_reset_mb": maxrss_before,
        "peak_reset": peak_reset,
        "peak_rss_mb": peak,
        "peak_above_loaded_mb": peak - rss_loaded,
        "rss_after_mb": rss_after,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        **decoder_sparsity(model),
        "load_avg_start": load_avg_start,
        "load_avg_end": os.getloadavg(),
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("method", "oneshot_s", "rss_loaded_mb", "peak_rss_mb",
                                             "decoder_linear_sparsity", "lm_head_sparsity")}))


if __name__ == "__main__":
    main()
