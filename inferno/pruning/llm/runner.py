"""The one sequential calibration runner every LLM pruning method plugs into.

1. ``capture_inputs``: run the model on the calibration token ids and stop it at the first decoder
   block with a forward pre-hook that raises; what the block would have received -- hidden states
   plus every other argument (attention mask, position ids, rotary cos/sin, cache position, ...) --
   is stored on CPU, one entry per calibration chunk. This works for every architecture because the
   model itself computes embeddings, positions and masks.
2. ``run_layers``: for each block in turn, move it alone to ``device``, hook every linear to feed a
   method-provided statistics collector, run the block on all chunks, let a callback prune (or just
   measure), then -- if weights changed -- rerun the block so the next block sees pruned outputs.
   The outputs replace the stored inputs, so peak memory does not grow with depth, and the state
   (``LayerInputs``) can be saved and resumed: ``prune_layers(..., layers=range(k))`` followed by
   ``prune_layers(..., layers=range(k, L))`` equals one pass.

Where a model keeps its blocks and linears is the only per-architecture knowledge (``BLOCK_PATHS``);
GPT-2's ``Conv1D`` stores its weight as (in, out) and is seen through ``get_weight``/``set_weight`` as
(out, in) like every ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from inferno.pruning.llm.masks import achieved_sparsity

# model_type -> attribute path of the decoder blocks (a ModuleList)
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


# ----------------------------------------------------------------------------------- adapter
def blocks_path(model: nn.Module) -> str:
    """Attribute path of the decoder blocks: by ``config.model_type``, else the first path that exists."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = [BLOCK_PATHS[model_type]] if model_type in BLOCK_PATHS else []
    candidates += [p for p in dict.fromkeys(BLOCK_PATHS.values()) if p not in candidates]
    for path in candidates:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    raise ValueError(f"cannot find the decoder blocks of model_type {model_type!r}; supported: {sorted(BLOCK_PATHS)}")


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(blocks_path(model))


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Every prunable matrix of a block (nn.Linear and GPT-2 Conv1D), by name inside the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) tensor (a view for Conv1D)."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data


@torch.no_grad()
def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back into the module."""
    target = module.weight.data
    target.copy_(weight.T if isinstance(module, Conv1D) else weight)


# ----------------------------------------------------------------------------------- state
@dataclass
class LayerInputs:
    """Inputs of block ``next_layer`` for every calibration chunk (hidden states on CPU)."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # positional arguments after hidden_states (GPT-2 passes the mask positionally)
    kwargs: list[dict]
    next_layer: int = 0

    def copy(self) -> LayerInputs:
        return LayerInputs(list(self.hidden), list(self.args), list(self.kwargs), self.next_layer)

    def save(self, path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path) -> LayerInputs:
        return cls(**torch.load(path, weights_only=True))


def _to(obj, device):
    """Move tensors inside nested tuples/lists/dicts; anything else is returned as is."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _drop_caches(obj):
    """KV caches must not travel between chunks: replace any Cache object by None."""
    from transformers.cache_utils import Cache

    if isinstance(obj, Cache):
        return None
    if isinstance(obj, tuple):
        return tuple(_drop_caches(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _drop_caches(v) for k, v in obj.items()}
    return obj


def calibration_chunks(calib_inputs, batch_size: int) -> list[torch.Tensor]:
    """Calibration token ids as a list of (b, seqlen) LongTensors."""
    if torch.is_tensor(calib_inputs):
        calib_inputs = calib_inputs if calib_inputs.dim() == 2 else calib_inputs.view(1, -1)
        return list(calib_inputs.split(batch_size))
    return [x if x.dim() == 2 else x.view(1, -1) for x in calib_inputs]


def _home(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _move_outside_blocks(module: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter/buffer of ``module`` except those inside ``blocks`` to ``device``."""
    if module is blocks:
        return
    if not any(b is blocks for b in module.modules()):
        module.to(device)
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)
    for child in module.children():
        _move_outside_blocks(child, blocks, device)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calib_inputs, device="cpu", batch_size: int = 8, store_device="cpu"
) -> LayerInputs:
    """Inputs of the first decoder block for every calibration chunk (see module docstring)."""
    blocks = get_blocks(model)
    home = _home(model)
    state = LayerInputs([], [], [])

    def grab(module, args, kwargs):
        kwargs = {k: (False if k == "use_cache" else v) for k, v in kwargs.items()}
        state.hidden.append(args[0].detach().to(store_device))
        state.args.append(_to(_drop_caches(tuple(args[1:])), store_device))
        state.kwargs.append(_to(_drop_caches(kwargs), store_device))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    _move_outside_blocks(model, blocks, device)
    try:
        for ids in calibration_chunks(calib_inputs, batch_size):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, home)
        model.config.use_cache = use_cache
    return state


# ----------------------------------------------------------------------------------- runner
StatsFactory = Callable[[str, nn.Module], object]  # (linear name, module) -> collector with .add(x)
Process = Callable[[int, dict, dict], bool]  # (layer index, linears, stats) -> weights changed?


@torch.no_grad()
def _forward_block(block, state: LayerInputs, device, store_device) -> list[torch.Tensor]:
    outs = []
    for h, args, kwargs in zip(state.hidden, state.args, state.kwargs):
        out = block(h.to(device), *_to(args, device), **_to(kwargs, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.detach().to(store_device))
    return outs


@torch.no_grad()
def run_layers(
    model: nn.Module,
    state: LayerInputs | None,
    layers: Iterable[int],
    process: Process,
    make_stats: StatsFactory | None = None,
    device="cpu",
    store_device="cpu",
    desc: str = "layers",
    progress: bool = True,
) -> LayerInputs | None:
    """Visit ``layers`` in order: collect statistics on the calibration inputs, call ``process``, and
    advance ``state`` to the (pruned) outputs. With ``state=None`` no forward pass is made (for
    methods that need no data). Layers must continue from ``state.next_layer``."""
    blocks = get_blocks(model)
    home = _home(model)
    layers = list(layers)
    for i in tqdm(layers, desc=desc, disable=not progress, leave=False):
        if state is not None and i != state.next_layer:
            raise ValueError(f"layers must be processed in order: expected layer {state.next_layer}, got {i}")
        block = blocks[i].to(device)
        try:
            linears = find_linears(block)
            stats, hooks = {}, []
            if state is not None and make_stats is not None:
                for name, mod in linears.items():
                    stats[name] = make_stats(name, mod)
                    hooks.append(mod.register_forward_hook(lambda m, inp, out, s=stats[name]: s.add(inp[0])))
            try:
                outs = _forward_block(block, state, device, store_device) if state is not None else None
            finally:
                for h in hooks:
                    h.remove()
            changed = process(i, linears, stats)
            del stats
            if state is not None:
                if changed:
                    outs = None  # free the stale outputs before recomputing
                    outs = _forward_block(block, state, device, store_device)
                state.hidden, state.next_layer = outs, i + 1
        finally:
            blocks[i].to(home)
    return state


def prune_layers(
    model: nn.Module,
    method,
    state: LayerInputs | None,
    layers: Iterable[int] | None = None,
    device="cpu",
    store_device="cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Prune ``layers`` (default: from ``state.next_layer`` to the end) with ``method``; returns
    {full linear name: achieved sparsity}. ``state`` is advanced in place."""
    path = blocks_path(model)
    if layers is None:
        start = state.next_layer if state is not None else 0
        layers = range(start, len(get_blocks(model)))
    report: dict[str, float] = {}

    def process(i: int, linears: dict, stats: dict) -> bool:
        for name, mod in linears.items():
            full = f"{path}.{i}.{name}"
            new = method.prune_weight(get_weight(mod), stats.get(name), layer_index=i, name=full)
            set_weight(mod, new)
            report[full] = achieved_sparsity(get_weight(mod))
        return True

    def make_stats(name: str, mod: nn.Module):
        return method.make_stats(get_weight(mod).shape[1], device)

    run_layers(model, state, layers, process, make_stats, device, store_device, f"prune[{method.name}]", progress)
    return report


def prune_model(
    model: nn.Module,
    method,
    calib_inputs=None,
    device="cpu",
    batch_size: int = 8,
    store_device="cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Prune every decoder-block linear of a HF causal LM in place with ``method``.

    ``calib_inputs``: LongTensor (n, seqlen) of token ids (or a list of them); unused by methods with
    ``needs_calibration = False``. Returns {linear name: achieved sparsity}.
    """
    was_training = model.training
    model.eval()
    try:
        state = None
        if method.needs_calibration:
            if calib_inputs is None:
                raise ValueError(f"method {method.name!r} needs calibration inputs (calib_inputs is None)")
            state = capture_inputs(model, calib_inputs, device, batch_size, store_device)
            if hasattr(method, "prepare"):  # e.g. OWL: a dense measuring pass before pruning
                method.prepare(model, state.copy(), device=device, store_device=store_device, progress=progress)
        return prune_layers(model, method, state, None, device, store_device, progress)
    finally:
        model.train(was_training)
