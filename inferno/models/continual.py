"""A temporal ConvNet trained offline on windows, and its step-wise twin from the ``continual-inference`` library.

``TemporalConvNet`` (``model=temporal_cnn``, kind ``temporal``) is plain ``torch.nn``, so the Lightning Trainer trains
it and Torch-Pruning prunes it: an embedding of the input symbols, residual blocks of two *valid* (unpadded) 1-D
convolutions (``conv1 -> bn1 -> ReLU -> conv2 -> bn2``, the input added back on the last ``T - 2(k-1)`` positions,
through a 1x1 ``proj`` where the widths differ, then ReLU), and a linear ``head`` on the last position. The network
is causal: the output at the last position depends on the last ``receptive_field = 1 + sum 2(k_i - 1)`` inputs only,
so ``forward`` crops a longer window to them (a window is never recomputed beyond what the output needs).

``to_continual`` converts a trained network (or any ``nn.Sequential`` of 1-D convolutions, norms and activations)
to the library's modules: ``co.Conv1d`` for every convolution, ``co.BroadcastReduce(Skip, block)`` (what
``co.Residual(..., residual_shrink="leading")`` builds) for a residual block, ``co.Linear`` for the head, the rest
mapped by ``co.continual``. ``StepNet`` runs it one input step at a time: ``forward(x_t)`` consumes the symbols of
step ``t`` (one per stream of the batch) and returns the output for the window ending at ``t``, from the state the
earlier steps left (the last ``k - 1`` partial products of every convolution, the residuals' skips).

Frame kernels. The library computes a step's partial products as a convolution of the new frame (length 1) padded
by ``k - 1`` on both sides: ``k`` output taps of ``k`` kernel taps each, ``k^2 C_in C_out`` multiply-accumulates of
which ``k (k - 1) C_in C_out`` multiply padding zeros (``torch.utils.flop_counter`` counts them, and the CPU kernel
does them). ``frame_kernel="matmul"`` computes the same ``k`` partial products as one matrix product of the frame
with the kernel taps (``k C_in C_out`` MACs, the intrinsic cost of a continual step); everything else -- the state,
its update, the delay -- stays the library's. ``frame_kernel="library"`` keeps the library as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import continual as co
import torch
import torch.nn.functional as F
from torch import nn

from inferno.errors import ConfigError, check_bool, check_choice, check_int

FRAME_KERNELS = ("library", "matmul")


def _int_list(key: str, value, n: int | None = None) -> list[int]:
    """``value`` (an int, broadcast to ``n`` entries, or a list of ints >= 1) as a list; one-line error otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and n is not None:
        value = [value] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{key}: {value!r} must be a non-empty list of integers >= 1")
    for v in value:
        check_int(key, v, 1)
    if n is not None and len(value) != n:
        raise ConfigError(f"{key}: {list(value)} has {len(value)} entries but model.channels has {n} blocks")
    return [int(v) for v in value]


class TemporalBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``, both convolutions of kernel ``k`` and unpadded, the skip
    ``x[:, :, 2(k-1):]`` (through the 1x1 ``proj`` when the widths differ): the last output position sees the last
    ``2k - 1`` inputs."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, residual: bool = True, mid: int | None = None):
        super().__init__()
        mid = mid or out_ch
        self.kernel_size, self.residual = kernel_size, residual
        self.conv1 = nn.Conv1d(in_ch, mid, kernel_size, bias=False)
        self.bn1 = nn.BatchNorm1d(mid)
        self.conv2 = nn.Conv1d(mid, out_ch, kernel_size, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.proj = nn.Conv1d(in_ch, out_ch, 1, bias=False) if residual and in_ch != out_ch else None

    @property
    def shrink(self) -> int:
        """Positions the block's output is shorter than its input."""
        return 2 * (self.kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            # the last positions by index_select, not a slice: Torch-Pruning reads a slice of dim 2 of a 3-D tensor
            # as a channel slice (its (batch, tokens, channels) layout) and would decouple the residual's channels
            skip = x.index_select(2, torch.arange(self.shrink, x.shape[2], device=x.device))
            y = y + (self.proj(skip) if self.proj is not None else skip)
        return F.relu(y)


class TemporalConvNet(nn.Module):
    """See the module docstring. ``forward`` takes ``(batch, window)`` symbol ids and returns ``(batch, classes)``
    logits for the symbol after the window."""

    def __init__(self, num_classes: int, embed_dim: int = 64, channels: Sequence[int] = (64, 64, 64),
                 kernel_sizes: Sequence[int] | int = 3, residual: bool = True, mids: Sequence[int] | None = None):
        super().__init__()
        check_int("model.num_classes", num_classes, 2)
        check_int("model.embed_dim", embed_dim, 1)
        channels = _int_list("model.channels", channels)
        kernel_sizes = _int_list("model.kernel_sizes", kernel_sizes, len(channels))
        check_bool("model.residual", residual)
        mids = _int_list("model.mids", mids, len(channels)) if mids is not None else channels
        self.embed = nn.Embedding(num_classes, embed_dim)
        widths = [embed_dim, *channels]
        self.blocks = nn.Sequential(*[TemporalBlock(widths[i], widths[i + 1], k, residual, mids[i])
                                      for i, k in enumerate(kernel_sizes)])
        self.head = nn.Linear(channels[-1], num_classes)

    @property
    def receptive_field(self) -> int:
        return 1 + sum(b.shrink for b in self.blocks)

    def spec(self) -> dict:
        """The architecture as it is now (channel pruning shrinks ``embed_dim``, ``channels`` and ``mids``)."""
        return {"num_classes": self.head.out_features, "embed_dim": self.embed.embedding_dim,
                "channels": [b.conv2.out_channels for b in self.blocks],
                "kernel_sizes": [b.kernel_size for b in self.blocks],
                "residual": all(b.residual for b in self.blocks),
                "mids": [b.conv1.out_channels for b in self.blocks]}

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, channels, positions)`` after the blocks, over the whole of ``ids``."""
        return self.blocks(self.embed(ids.long()).transpose(1, 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rf = self.receptive_field
        if ids.shape[1] < rf:
            raise ValueError(f"a window of {ids.shape[1]} steps is shorter than the receptive field {rf}")
        return self.head(self.features(ids[:, ids.shape[1] - rf:])[:, :, -1])


# ----------------------------------------------------------------------------------- conversion
def frame_conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                 dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv1d`` with every argument the same; a one-step input padded by ``k - 1`` (the library's step call,
    stride 1, no dilation, one group) is computed as one matrix product: output tap ``j`` is the frame times kernel
    tap ``k - 1 - j``, so the ``k (k - 1)`` products with the padding zeros are never made."""
    k = weight.shape[-1]
    as_tuple = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,))
    if (input.dim() == 3 and input.shape[-1] == 1 and as_tuple(padding) == (k - 1,) and as_tuple(stride) == (1,)
            and as_tuple(dilation) == (1,) and groups == 1):
        c_out, c_in = weight.shape[0], weight.shape[1]
        taps = weight.flip(-1).permute(2, 0, 1).reshape(k * c_out, c_in)  # row j * c_out + o: W[o, :, k - 1 - j]
        out = F.linear(input[:, :, 0], taps, None if bias is None else bias.repeat(k))
        return out.view(input.shape[0], k, c_out).transpose(1, 2)
    return F.conv1d(input, weight, bias, stride, padding, dilation, groups)


def _conv(conv: nn.Conv1d, frame_kernel: str, where: str) -> co.Conv1d:
    if conv.stride[0] != 1 or conv.dilation[0] != 1:
        raise ConfigError(f"model: {where} has temporal stride {conv.stride[0]} / dilation {conv.dilation[0]}; the "
                          "continual library steps only stride-1, undilated convolutions")
    if conv.padding_mode != "zeros":
        raise ConfigError(f"model: {where} pads with {conv.padding_mode!r}; continual steps need zero padding")
    m = co.Conv1d.build_from(conv)
    if frame_kernel == "matmul":
        m._conv_func = frame_conv1d  # the library's hook for the convolution it calls; see the module docstring
    return m


def _convert(module: nn.Module, frame_kernel: str, where: str) -> nn.Module:
    if isinstance(module, nn.Conv1d):
        return _conv(module, frame_kernel, where)
    if isinstance(module, TemporalBlock):
        main = co.Sequential(OrderedDict([
            ("conv1", _conv(module.conv1, frame_kernel, f"{where}.conv1")), ("bn1", module.bn1), ("relu1", nn.ReLU()),
            ("conv2", _conv(module.conv2, frame_kernel, f"{where}.conv2")), ("bn2", module.bn2)]))
        if not module.residual:
            return co.Sequential(main, nn.ReLU())
        # offline: x[:, :, shrink:]; stepping: the current input, after the warm-up (kernel 1: no shrink, no delay)
        skip = co.Skip(module.shrink) if module.shrink else co.Identity()
        if module.proj is not None:
            skip = co.Sequential(skip, _conv(module.proj, frame_kernel, f"{where}.proj"))
        return co.Sequential(co.BroadcastReduce(skip, main, reduce="sum", auto_delay=False), nn.ReLU())
    if isinstance(module, nn.Sequential):
        return co.Sequential(OrderedDict([(n, _convert(m, frame_kernel, f"{where}.{n}" if where else n))
                                          for n, m in module.named_children()]))
    if isinstance(module, nn.Linear):  # on the channels of a (batch, channels[, time]) step
        return co.Linear.build_from(module, channel_dim=1)
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        raise ConfigError(f"model: {where or type(module).__name__} is a {type(module).__name__}; a continual "
                          "model needs a temporal (1-D) network, e.g. model=temporal_cnn")
    try:
        return co.continual(module)
    except AssertionError:
        raise ConfigError(f"model: {where or 'the network'} ({type(module).__name__}) has no continual counterpart; a "
                          "continual model is built from 1-D convolutions, norms, activations and linears") from None


def to_continual(net: nn.Module, frame_kernel: str = "library") -> nn.Module:
    """The library's continual twin of ``net`` (a ``TemporalConvNet``: a ``StepNet``; an ``nn.Sequential`` or a
    single layer: the ``co`` module), sharing nothing with ``net`` but copies of its weights and statistics."""
    import copy

    check_choice("frame_kernel", frame_kernel, FRAME_KERNELS, "frame kernel")
    net = copy.deepcopy(net).eval()
    if isinstance(net, TemporalConvNet):
        body = co.Sequential(OrderedDict([("blocks", _convert(net.blocks, frame_kernel, "blocks")),
                                          ("head", _convert(net.head, frame_kernel, "head"))]))
        return StepNet(net.embed, body, frame_kernel).eval()
    if not any(isinstance(m, (nn.Conv1d, TemporalBlock)) for m in net.modules()):
        raise ConfigError(f"model: {type(net).__name__} is not a temporal model (no 1-D convolution to step); a "
                          "continual model needs a temporal network, e.g. model=temporal_cnn")
    return _convert(net, frame_kernel, "").eval()


def _clone(state):
    """A copy of the library's nested step state (tuples and lists of tensors, None where a module has none)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(s) for s in state)
    return state


class StepNet(nn.Module):
    """One step of continual inference. ``forward(ids)`` takes ``(batch,)`` symbol ids, the next step of ``batch``
    streams, and returns ``(batch, classes)`` logits for the windows ending there (None while warming up: the first
    ``delay`` steps of fresh streams).

    Each step runs the library's state-passing step, ``body._forward_step(x, state) -> (out, next_state)`` (what its
    ONNX export, ``co.onnx.OnnxWrapper``, wraps; ``forward_step`` is the same computation behind a per-module
    call-mode dispatch), with the state held here per batch size and device: ``begin(batch)`` starts fresh streams,
    ``prepare(batch, ...)`` warmed ones (``delay`` steps of symbol 0), so a cost measurement at batch 1 and a latency
    one at batch 256 each step a warm network; ``forward`` on a batch size not begun raises."""

    def __init__(self, embed: nn.Embedding, body: co.Sequential, frame_kernel: str = "library"):
        super().__init__()
        self.embed, self.body, self.frame_kernel = embed, body, frame_kernel
        self._states: dict[tuple, object] = {}

    @property
    def delay(self) -> int:
        return int(self.body.delay)

    @property
    def receptive_field(self) -> int:
        return int(self.body.receptive_field)

    def _key(self, batch_size: int) -> tuple:
        return batch_size, str(self.embed.weight.device)

    def reset(self) -> None:
        """Forget every stream."""
        self._states = {}

    def begin(self, batch_size: int) -> None:
        """Start ``batch_size`` fresh streams on the current device (their first ``delay`` steps warm them up)."""
        self._states[self._key(batch_size)] = None

    def state(self, batch_size: int):
        """The library's nested state of the ``batch_size`` streams (None before their first step)."""
        return self._states[self._key(batch_size)]

    @torch.no_grad()
    def prepare(self, *batch_sizes: int) -> StepNet:
        """Warm streams (``delay`` steps of symbol 0 taken) for each batch size, on the current device."""
        for b in batch_sizes:
            self.begin(b)
            zeros = torch.zeros(b, dtype=torch.long, device=self.embed.weight.device)
            for _ in range(self.delay):
                self.step(zeros)
        return self

    def step(self, ids: torch.Tensor, update_state: bool = True) -> torch.Tensor | None:
        """One step of the streams of ``ids``'s batch size; ``update_state=False`` leaves their state as it was
        (the step runs on a copy)."""
        key = self._key(ids.shape[0])
        if key not in self._states:
            raise RuntimeError(f"StepNet: no streams of batch {key[0]} on {key[1]}; call begin or prepare first")
        state = self._states[key] if update_state else _clone(self._states[key])
        out, state = self.body._forward_step(self.embed(ids.long()), state)
        if update_state:
            self._states[key] = state
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        return self.step(ids)


@torch.no_grad()
def stream_logits(step_net: StepNet, inputs: torch.Tensor, n_targets: int, streams: int = 64,
                  progress=None) -> torch.Tensor:
    """Logits for ``n_targets`` consecutive predictions from stepping ``inputs`` (1-D ids, ``n_targets + delay``
    of them: the output after input ``delay + i`` is prediction ``i``), as ``streams`` parallel streams, each fed
    its own contiguous chunk plus the ``delay`` inputs before it (its warm-up). ``progress`` wraps the step loop."""
    d = step_net.delay
    if len(inputs) != n_targets + d:
        raise ValueError(f"{len(inputs)} inputs for {n_targets} targets and a delay of {d}")
    streams = max(1, min(streams, n_targets))
    chunk = -(-n_targets // streams)
    device = step_net.embed.weight.device
    padded = torch.zeros(streams * chunk + d, dtype=torch.long, device=device)
    padded[:len(inputs)] = inputs.to(device)
    x = padded.unfold(0, chunk + d, chunk)  # (streams, chunk + d): stream s predicts targets s*chunk ...
    step_net.begin(streams)  # fresh streams: their own first inputs warm them up
    out = []
    steps = range(chunk + d)
    for t in progress(steps) if progress else steps:
        y = step_net.step(x[:, t])
        if t >= d:
            out.append(y)
    step_net.reset()
    logits = torch.stack(out, dim=1)  # (streams, chunk, classes)
    return logits.reshape(streams * chunk, -1)[:n_targets]
