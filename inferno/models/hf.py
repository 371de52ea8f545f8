"""Hugging Face causal LMs: load from a local folder, build tiny random ones, inject outlier
channels without changing the function, save a pruned model with its sparsity report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from inferno.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES) + ['auto']}, got {dtype!r}")
    return _DTYPES[dtype]


def load_causal_lm(path, dtype="float32", device="cpu") -> nn.Module:
    """A causal LM from a local folder (never downloads), in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r} is not a local folder with a Hugging Face model")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(dtype), trust_remote_code=False, local_files_only=True
    )
    return model.to(device).eval()


def tiny_config(
    family: str,
    vocab_size: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 128,
):
    """A small transformers config of the given family (hidden 64, 2 blocks, vocab 256 by default)."""
    import transformers as tf

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    raise ConfigError(f"model family must be one of {list(FAMILIES)}, got {family!r}")


def tiny_causal_lm(family: str = "llama", seed: int = 0, **config_overrides) -> nn.Module:
    """A randomly initialised small causal LM (deterministic given ``seed``), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def outlier_pairs(block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """A Llama-family block's (RMSNorm, linears reading its output) pairs."""
    return [
        (block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]),
        (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj]),
    ]


@torch.no_grad()
def important_channels(norm: nn.Module, linears: list[nn.Linear], count: int) -> torch.Tensor:
    """The ``count`` channels whose removal costs most, from the weights alone: |g_j| * ||[W_1; ...; W_m][:, j]||_2
    (norm gain times the norm of the input column over every linear reading the norm)."""
    col = torch.stack([lin.weight.float().pow(2).sum(0) for lin in linears]).sum(0).sqrt()
    score = norm.weight.float().abs() * col
    return torch.topk(score, count).indices.sort().values


@torch.no_grad()
def inject_outliers(model: nn.Module, channels="important", factor: float = 50.0, count: int = 4) -> nn.Module:
    """Make a few hidden channels huge without changing the function (Llama family: llama, mistral, qwen2).

    In every block, RMSNorm weight channel c is multiplied by ``factor`` and the input column c of the
    linears that read that norm's output (q/k/v after ``input_layernorm``; gate/up after
    ``post_attention_layernorm``) is divided by it: the products are unchanged, but |W| in those
    columns shrinks while the activations grow -- the situation where magnitude pruning fails and
    activation-aware scores (Wanda) do not.

    ``channels``: a list (the same channels in every norm); ``"important"``: each norm's ``count`` most
    important channels (``important_channels``) -- in real LLMs the outlier features are the channels the model
    relies on most, which is what makes magnitude pruning fail there; ``"spread"``: ``count`` evenly spaced ones.
    """
    if channels == "important":
        pick = lambda norm, linears: important_channels(norm, linears, count)
    elif isinstance(channels, str) and channels != "spread":
        raise ConfigError(f"model.outlier_channels: '{channels}' is not important, spread or a list of channels")
    else:
        hidden = model.config.hidden_size
        fixed = (torch.arange(count) * hidden // count + hidden // (2 * count) if channels == "spread"
                 else torch.as_tensor(list(channels), dtype=torch.long))
        pick = lambda norm, linears: fixed
    for block in model.model.layers:
        for norm, linears in outlier_pairs(block):
            idx = pick(norm, linears)
            norm.weight[idx] *= factor
            for lin in linears:
                lin.weight[:, idx] /= factor
    return model


def save_pruned(model: nn.Module, tokenizer, outdir, report: dict) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer if given + ``pruning_report.json``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers >= 5 always writes safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    values = list(report.values())
    summary = {
        "mean_layer_sparsity": sum(values) / len(values) if values else 0.0,
        "layers": report,
    }
    (out / "pruning_report.json").write_text(json.dumps(summary, indent=2))
    return out


# ----------------------------------------------------------------------------------- builders of conf/model
def torch_device(accelerator: str | None) -> str:
    """Hardware config's accelerator -> torch device string (``cost.run_device``)."""
    from inferno.cost import run_device

    return str(run_device(accelerator))


def _outliers(model: nn.Module, channels, factor: float, count: int) -> None:
    if getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise ConfigError(f"model.outliers: needs a Llama-family model (llama, mistral, qwen2), not {model.config.model_type}")
    inject_outliers(model, channels, float(factor), int(count))


def load_model(
    path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    outliers: bool = False,
    outlier_channels="important",
    outlier_factor: float = 50.0,
    outlier_count: int = 4,
    hint: str | None = None,
) -> nn.Module:
    """A local Hugging Face causal LM (``trust_remote_code`` off, never downloads), optionally with
    function-preserving outlier channels (``inject_outliers``)."""
    if not path:
        raise ConfigError("model.path: set model.path=DIR, a local Hugging Face causal-LM folder")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path: no Hugging Face model in {path}" + (f" ({hint})" if hint else ""))
    model = load_causal_lm(path, dtype=dtype, device=torch_device(device))
    if outliers:
        _outliers(model, outlier_channels, outlier_factor, outlier_count)
    return model


def tiny_model(family: str = "llama", seed: int = 0, dtype: str = "float32", device: str = "cpu", outliers: bool = False,
               outlier_channels="important", outlier_factor: float = 50.0, outlier_count: int = 4, **config) -> nn.Module:
    """A small random model of a family (``models.hf.tiny_causal_lm``), for tests and smoke runs."""
    model = tiny_causal_lm(family, seed=seed, **config)
    if outliers:
        _outliers(model, outlier_channels, outlier_factor, outlier_count)
    return model.to(device=torch_device(device), dtype=_dtype(dtype)).eval()
