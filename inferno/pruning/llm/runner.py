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

Where the blocks come from is pluggable (a *block source*, ``block_source``): by default they live in the model
(:class:`ResidentBlocks`: each visits ``device`` and goes back); a model streamed from disk
(``inferno.models.stream``, ``model.stream=true``) carries its own source, which materialises one block at a time
from the safetensors and writes it out pruned -- the runner's loop is the same either way.

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

from inferno.cost import to_device
from inferno.pruning.llm.masks import achieved_sparsity

# model_type -> attribute path of the decoder blocks (a ModuleList)
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "bert": "bert.encoder.layer",  # models.encoder.EncoderClassifier (a BertModel at .bert)
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


class ResidentBlocks:
    """The default block source: the blocks live in the model; a visited block moves to ``device`` and goes back
    to the model's device when it is closed.

    A block source has ``open(i, device) -> module`` (block ``i``, materialised on ``device``) and
    ``close(i, changed)`` (the visit is over; ``changed``: the weights were changed, e.g. pruned)."""

    def __init__(self, model: nn.Module):
        self.blocks, self.home = get_blocks(model), _home(model)

    def open(self, i: int, device) -> nn.Module:
        return self.blocks[i].to(device)

    def close(self, i: int, changed: bool) -> None:
        self.blocks[i].to(self.home)


def block_source(model: nn.Module):
    """The model's own block source (``model.block_source``, a streamed model's) else :class:`ResidentBlocks`."""
    return getattr(model, "block_source", None) or ResidentBlocks(model)


def each_block(model: nn.Module, device=None, progress: bool = False, desc: str = "blocks"):
    """Every decoder block in turn, opened through the model's block source (on ``device``, default the model's)
    and closed unchanged after the caller's loop body: reading the weights of a model that is not whole in memory."""
    source, device = block_source(model), device or _home(model)
    for i in tqdm(range(len(get_blocks(model))), desc=desc, disable=not progress, leave=False):
        block = source.open(i, device)
        try:
            yield block
        finally:
            source.close(i, False)


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_inputs(
    model: nn.Module, calib_inputs, device="cpu", batch_size: int = 8, store_device="cpu", progress: bool = False
) -> LayerInputs:
    """Inputs of the first decoder block for every calibration chunk (see module docstring); ``progress``: a bar
    over the chunks."""
    blocks = get_blocks(model)
    home = _home(model)
    state = LayerInputs([], [], [])

    def grab(module, args, kwargs):
        kwargs = {k: (False if k == "use_cache" else v) for k, v in kwargs.items()}
        state.hidden.append(args[0].detach().to(store_device))
        state.args.append(to_device(_drop_caches(tuple(args[1:])), store_device))
        state.kwargs.append(to_device(_drop_caches(kwargs), store_device))
        raise _Captured

    # prepend: before any hook of the block's own (a streamed block would load itself from disk for nothing)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    _move_outside_blocks(model, blocks, device)
    try:
        for ids in tqdm(calibration_chunks(calib_inputs, batch_size), desc="capture inputs", disable=not progress,
                        leave=False):
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


@dataclass
class Block:
    """What a method sees of one decoder block while the runner visits it.

    ``stats``: one collector per linear, fed every calibration input the linear read. Linears that read the
    same tensor (q/k/v after the input norm, gate/up after the post-attention norm, OPT's q/k/v) share ONE
    collector object -- the statistics of an input are collected once, not once per reader -- and
    ``shared[name]`` names the first linear that read it (its own name when it shares nothing).
    ``inputs``: the block's calibration inputs (hidden states and every other forward argument);
    ``outputs``: the block's outputs on them before ``process`` changes anything (None without data, and for
    methods that do not set ``needs_outputs = True``: the statistics pass then stops at the last linear);
    ``config``: the model's config.
    """

    index: int
    module: nn.Module
    linears: dict[str, nn.Module]
    stats: dict[str, object]
    shared: dict[str, str]
    inputs: LayerInputs | None = None
    outputs: list[torch.Tensor] | None = None
    config: object = None  # the model's config (head counts, sizes)


Process = Callable[[Block], bool]  # -> weights changed (the block's outputs are then recomputed)


class _StatsDone(Exception):
    """Raised by the last linear's hook: every statistic of the chunk is in, the rest of the block is not needed."""


@torch.no_grad()
def _forward_block(block, state: LayerInputs, device, store_device, stats: _SharedStats | None = None,
                   last_use: bool = False):
    """The block on every chunk; its outputs, or None when ``stats`` ends each chunk at the last linear.
    ``last_use``: the inputs are not needed after this pass, so each chunk's input is dropped as soon as its
    output exists (the outputs replace the inputs one by one: one copy of the hidden states, not two)."""
    outs = []
    for j, (h, args, kwargs) in enumerate(zip(state.hidden, state.args, state.kwargs)):
        if stats is not None:
            stats.new_chunk()
        try:
            out = block(h.to(device), *to_device(args, device), **to_device(kwargs, device))
        except _StatsDone:
            outs = None
            continue
        out = out[0] if isinstance(out, (tuple, list)) else out
        if outs is not None:
            outs.append(out.detach().to(store_device))
        if last_use:
            del h
            state.hidden[j] = None
    return outs


class _SharedStats:
    """Forward pre-hooks that feed each distinct linear input to one collector.

    Readers of one input are found by identity: consecutive linear calls on the very same tensor object
    (a reference to the last input is held, so its memory cannot be reused by another tensor meanwhile).
    The grouping and the call order are fixed on the first chunk and checked on every later one. With
    ``stop=True`` later chunks end at the last linear's input (``_StatsDone``): what follows it -- the last
    linear's own matmul and the residual -- feeds no statistic."""

    def __init__(self, linears: dict[str, nn.Module], make_stats: StatsFactory, share: bool = True, stop: bool = False):
        self.linears, self.make_stats, self.share, self.stop = linears, make_stats, share, stop
        self.stats: dict[str, object] = {}
        self.shared: dict[str, str] = {}
        self.order: list[str] = []  # call order on the first chunk
        self.chunk = -1
        self._last: tuple[torch.Tensor, str] | None = None
        self.handles = [mod.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, mod in linears.items()]

    def new_chunk(self) -> None:
        self.chunk += 1
        self._last = None

    def _hook(self, name: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            same = self.share and self._last is not None and self._last[0] is x
            owner = self.shared.get(self._last[1]) if same else name
            if name not in self.shared:
                self.shared[name] = owner
                self.stats[name] = self.stats[owner] if owner != name else self.make_stats(name, mod)
                self.order.append(name)
            elif self.shared[name] != owner:
                raise RuntimeError(f"linear {name!r} read a different input than on the first calibration chunk")
            if owner == name:
                self.stats[name].add(x)
            self._last = (x, name)
            if self.stop and self.chunk > 0 and name == self.order[-1]:
                self._last = None
                raise _StatsDone

        return hook

    def close(self) -> tuple[dict, dict]:
        for h in self.handles:
            h.remove()
        self._last = None
        for name, mod in self.linears.items():  # never called (e.g. unused): an empty collector of its own
            if name not in self.stats:
                self.shared[name] = name
                self.stats[name] = self.make_stats(name, mod)
        return self.stats, self.shared


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
    share_stats: bool = True,
    outputs: bool = True,
    last_outputs: bool = True,
    sequential: bool = True,
) -> LayerInputs | None:
    """Visit ``layers`` in order: collect statistics on the calibration inputs (one collector per distinct
    input, see :class:`Block`), call ``process(Block)``, and advance ``state`` to the (pruned) outputs. With
    ``state=None`` no forward pass is made (for methods that need no data). Layers must continue from
    ``state.next_layer``.

    ``outputs=False``: ``process`` will change the block (so its outputs are recomputed after it) and does not
    read ``Block.outputs``: the statistics pass then ends each chunk at the last linear's input.
    ``last_outputs=False``: the model's final block is not rerun after ``process`` (nothing reads its outputs;
    ``state.hidden`` is then left empty).
    ``sequential=False``: every block sees the *dense* model's inputs -- its outputs before ``process`` feed the
    next block, never recomputed -- so all statistics come from one pass over the dense model (the INFERNO
    thesis' reference); ``True`` (default, Wanda and SparseGPT) feeds each block the pruned blocks' outputs."""
    n_blocks, source = len(get_blocks(model)), block_source(model)
    layers = list(layers)
    for i in tqdm(layers, desc=desc, disable=not progress, leave=False):
        if state is not None and i != state.next_layer:
            raise ValueError(f"layers must be processed in order: expected layer {state.next_layer}, got {i}")
        block, changed = source.open(i, device), False
        try:
            linears = find_linears(block)
            stats, shared, outs = {}, {name: name for name in linears}, None
            if state is not None:
                stop = outputs is False and sequential  # the dense outputs are the next inputs: run whole blocks
                hooks = _SharedStats(linears, make_stats, share_stats, stop=stop) if make_stats is not None else None
                try:
                    outs = _forward_block(block, state, device, store_device, hooks)
                finally:
                    if hooks is not None:
                        stats, shared = hooks.close()
            view = Block(i, block, linears, stats, shared, state, outs if outputs else None, getattr(model, "config", None))
            changed = process(view) or not outputs
            del stats, view
            if state is not None:
                if changed and sequential:
                    outs = None  # free the stale outputs before recomputing
                    final = i == n_blocks - 1 and not last_outputs
                    outs = [] if final else _forward_block(block, state, device, store_device, last_use=True)
                state.hidden, state.next_layer = outs, i + 1
        except BaseException:
            changed = False  # an unfinished visit: a streamed block is not written out
            raise
        finally:
            source.close(i, changed)
    return state


def prune_layers(
    model: nn.Module,
    method,
    state: LayerInputs | None,
    layers: Iterable[int] | None = None,
    device="cpu",
    store_device="cpu",
    progress: bool = True,
    last_outputs: bool = True,
    sequential: bool = True,
) -> dict[str, float]:
    """Prune ``layers`` (default: from ``state.next_layer`` to the end) with ``method``; returns
    {full linear name: achieved sparsity}. ``state`` is advanced in place.

    A per-linear method (``prune_weight``) gets each linear's weight and statistics; a block-level method
    (``prune_block``) gets the whole :class:`Block` and returns a structural decision
    (``surgery.BlockDecision``: KV groups / MLP neurons to remove) that the shared surgery applies --
    physically (``method.apply == "remove"``) or by zeroing the same rows and columns (``"mask"``); the
    per-layer sizes it leaves are kept in ``method.structure``."""
    path = blocks_path(model)
    if layers is None:
        start = state.next_layer if state is not None else 0
        layers = range(start, len(get_blocks(model)))
    report: dict[str, float] = {}

    def process(b: Block) -> bool:
        if hasattr(method, "prune_block"):
            from inferno.pruning.llm import surgery

            decision = method.prune_block(b)
            if decision is not None:
                mode = getattr(method, "apply", "remove")
                if mode == "remove":
                    sizes = surgery.remove_from_block(b.module, model.config, decision)
                else:
                    surgery.mask_block(b.module, model.config, decision)
                    sizes = {}
                getattr(method, "structure", {})[b.index] = sizes
        else:
            for name, mod in b.linears.items():
                full = f"{path}.{b.index}.{name}"
                new = method.prune_weight(get_weight(mod), b.stats.get(name), layer_index=b.index, name=full)
                set_weight(mod, new)
        for name, mod in b.linears.items():  # shrunk in place by the surgery: the block's linears as they are now
            report[f"{path}.{b.index}.{name}"] = achieved_sparsity(get_weight(mod))
        return True

    def make_stats(name: str, mod: nn.Module):
        return method.make_stats(get_weight(mod).shape[1], device)

    run_layers(model, state, layers, process, make_stats, device, store_device, f"prune[{method.name}]", progress,
               share_stats=getattr(method, "share_stats", True), outputs=getattr(method, "needs_outputs", False),
               last_outputs=last_outputs, sequential=sequential)
    return report


def prune_model(
    model: nn.Module,
    method,
    calib_inputs=None,
    device="cpu",
    batch_size: int = 8,
    store_device="cpu",
    progress: bool = True,
    sequential: bool = True,
) -> dict[str, float]:
    """Prune every decoder-block linear of a HF causal LM in place with ``method``.

    ``calib_inputs``: LongTensor (n, seqlen) of token ids (or a list of them); unused by methods with
    ``needs_calibration = False``. ``sequential``: see :func:`run_layers` (False: statistics of the dense
    model, one pass). Returns {linear name: achieved sparsity}.
    """
    was_training = model.training
    model.eval()
    try:
        state = None
        if method.needs_calibration:
            if calib_inputs is None:
                raise ValueError(f"method {method.name!r} needs calibration inputs (calib_inputs is None)")
            state = capture_inputs(model, calib_inputs, device, batch_size, store_device, progress)
            if hasattr(method, "prepare"):  # OWL, FLAP, ShortGPT: a dense measuring pass; NIRVANA: gradients
                method.prepare(model, state.copy(), device=device, store_device=store_device, progress=progress,
                               calib=calib_inputs, batch_size=batch_size)
            if getattr(method, "global_decisions", False):
                state = None  # every decision is made: apply them without further forward passes
        # nothing reads the final block's pruned outputs: it is not rerun
        report = prune_layers(model, method, state, None, device, store_device, progress, last_outputs=False,
                              sequential=sequential)
        if hasattr(method, "finalize"):  # whole blocks (ShortGPT) go after every per-block decision
            method.finalize(model)
        return report
    finally:
        model.train(was_training)
