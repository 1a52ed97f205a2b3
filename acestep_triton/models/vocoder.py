"""The `music_vocoder` component: ADaMoS HiFi-GAN (log-mel -> 44.1 kHz waveform) and its log-mel transform.

A ConvNeXt backbone turns a 128-bin log-mel into `dims[-1]` features per frame; a HiFi-GAN head
upsamples them by `prod(upsample_rates)` (= `hop_length`) samples per frame. Parameter names and
shapes equal the published checkpoint, including the `weight_g`/`weight_v` pairs of the old
`torch.nn.utils.weight_norm`, which this module stores as plain parameters. The log-mel transform
(only used to encode audio) keeps its two checkpoint buffers: the Hann window and the mel filterbank.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

STEM_KERNEL_SIZE = 7
CONVNEXT_MLP_RATIO = 4
LAYER_SCALE_INIT = 1e-6
NORM_EPS = 1e-6
MAGNITUDE_EPS = 1e-6
LOG_MEL_FLOOR = 1e-5

# Slaney mel scale: linear below 1 kHz at 200/3 Hz per mel, logarithmic above.
SLANEY_HZ_PER_MEL = 200.0 / 3.0
SLANEY_LOG_START_HZ = 1000.0
SLANEY_LOG_START_MEL = SLANEY_LOG_START_HZ / SLANEY_HZ_PER_MEL
SLANEY_LOG_STEP = math.log(6.4) / 27.0


def overlapping_windows(total: int, window: int, context: int) -> list[tuple[int, int, int]]:
    """Windows of `window` frames over `total` frames (total > window), for decoders whose output at a
    frame depends on at most `context` frames on either side: (start, keep_from, keep_to) per window,
    window frames start..start+window, of which keep_from..keep_to are kept. Windows overlap by
    `context` on each side of what they keep; the last one is aligned to the end."""
    if window <= 2 * context:
        raise ValueError(f"window: {window} frames must exceed twice the context ({context} frames)")
    spans = []
    kept = 0
    while kept < total:
        start = min(max(0, kept - context), total - window)
        stop = start + window
        keep_to = total if stop == total else stop - context
        spans.append((start, kept, keep_to))
        kept = keep_to
    return spans


def receptive_context_frames(cfg: Mapping) -> int:
    """Mel frames on each side of a frame that can change its output samples, for a vocoder config.

    An upper bound on the half-width of the network's receptive field: the backbone's convolutions
    reach whole frames, each head stage reaches samples at its own rate. Reads only the config, so a
    model that does not load the vocoder (acestep_stream's chunked decode) can compute it.
    """
    reach = STEM_KERNEL_SIZE // 2 + sum(cfg["depths"]) * (cfg["kernel_sizes"][0] // 2) + cfg["pre_conv_kernel_size"] // 2
    resblock_reach = max(
        sum((d + 1) * (k // 2) for d in dilations)
        for k, dilations in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])
    )
    samples_per_frame = 1
    for rate, kernel in zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"]):
        reach += math.ceil(kernel / rate) / samples_per_frame
        samples_per_frame *= rate
        reach += resblock_reach / samples_per_frame
    reach += (cfg["post_conv_kernel_size"] // 2) / samples_per_frame
    return math.ceil(reach)


def aligned_chunks(total: int, chunk: int, context: int, align: int) -> list[tuple[int, int, int, int]]:
    """Consecutive chunks of a `total`-frame signal for a decoder whose output at a frame depends on at
    most `context` frames on either side: (start, stop, keep_from, keep_to) per chunk, decode frames
    start..stop and keep keep_from..keep_to. Every boundary is a multiple of `align` frames (or an end
    of the signal), so a resampler after the decoder sees each chunk at the phase it has in the whole
    signal; `chunk` and the context margin are rounded up to whole `align` blocks. The kept parts tile
    0..total in order, so they can be sent as they are decoded and equal one whole decode."""
    block = math.ceil(chunk / align) * align
    margin = math.ceil(context / align) * align
    chunks = []
    for keep_from in range(0, total, block):
        keep_to = min(total, keep_from + block)
        chunks.append((max(0, keep_from - margin), min(total, keep_to + margin), keep_from, keep_to))
    return chunks


def run_grouped(windows: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], group: int | None) -> torch.Tensor:
    """run(windows) for windows [N, ...], `group` rows per call (default: all); a short last group is
    filled up with copies of its first row, so every call has the one shape [group, ...]."""
    group = group or windows.shape[0]
    outputs = []
    for first in range(0, windows.shape[0], group):
        chunk = windows[first : first + group]
        short = group - chunk.shape[0]
        if short:
            chunk = torch.cat([chunk, chunk[:1].expand(short, *chunk.shape[1:])])
        outputs.append(run(chunk)[: group - short])
    return torch.cat(outputs)


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return dilation * (kernel_size - 1) // 2


def _split_weight(conv: nn.Module) -> None:
    """Replace `conv.weight` by magnitude `weight_g` (norm over all but dim 0) and direction `weight_v`."""
    weight = conv.weight.detach()
    del conv.weight
    conv.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, 0))
    conv.weight_v = nn.Parameter(weight)


class WeightNormConv1d(nn.Conv1d):
    """Conv1d with weight `weight_g * weight_v / ||weight_v||` (norm per output channel).

    Also takes x [B, C, 1, L] (HiFiGANHead's channels-last mode): the same convolution as a
    (1, k) Conv2d, which cuDNN runs on channels-last data without layout transposes.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _split_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 0)
        if x.dim() == 4:
            return F.conv2d(x, weight[:, :, None], self.bias, (1, *self.stride), (0, *self.padding),
                            (1, *self.dilation), self.groups)
        return self._conv_forward(x, weight, self.bias)


class WeightNormConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d with weight norm over dim 0, which here is the input-channel axis."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _split_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, L], or [B, C, 1, L] as in WeightNormConv1d."""
        weight = torch._weight_norm(self.weight_v, self.weight_g, 0)
        if x.dim() == 4:
            return F.conv_transpose2d(x, weight[:, :, None], self.bias, (1, *self.stride), (0, *self.padding),
                                      (0, *self.output_padding), self.groups, (1, *self.dilation))
        return F.conv_transpose1d(
            x, weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of [B, C, L], written out as the checkpoint's training code computed it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + NORM_EPS)
        return self.weight[:, None] * x + self.bias[:, None]


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm -> MLP (x4, GELU) -> layer scale, residual. [B, C, L] -> [B, C, L]."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=_same_padding(kernel_size), groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, CONVNEXT_MLP_RATIO * dim)
        self.pwconv2 = nn.Linear(CONVNEXT_MLP_RATIO * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).transpose(1, 2)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ConvNeXtBackbone(nn.Module):
    """Log-mel [B, input_channels, F] -> features [B, dims[-1], F]."""

    def __init__(self, input_channels: int, depths: list[int], dims: list[int], kernel_size: int) -> None:
        super().__init__()
        stem = nn.Sequential(
            nn.Conv1d(
                input_channels,
                dims[0],
                STEM_KERNEL_SIZE,
                padding=_same_padding(STEM_KERNEL_SIZE),
                padding_mode="replicate",
            ),
            ChannelsFirstLayerNorm(dims[0]),
        )
        transitions = [
            nn.Sequential(ChannelsFirstLayerNorm(c_in), nn.Conv1d(c_in, c_out, 1))
            for c_in, c_out in zip(dims[:-1], dims[1:])
        ]
        self.channel_layers = nn.ModuleList([stem, *transitions])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim, kernel_size) for _ in range(depth)))
            for depth, dim in zip(depths, dims)
        )
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for channel_layer, stage in zip(self.channel_layers, self.stages):
            x = stage(channel_layer(x))
        return self.norm(x)


class ResBlock(nn.Module):
    """HiFi-GAN residual block: per dilation, SiLU -> dilated conv -> SiLU -> conv, added back. [B, C, L]."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WeightNormConv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = conv2(F.silu(conv1(F.silu(x)))) + x
        return x


class HiFiGANHead(nn.Module):
    """Features [B, in_channels, F] -> waveform [B, 1, F * prod(upsample_rates)] in [-1, 1].

    With `channels_last` set (the gpu profile does), activations are held as [B, C, 1, L] in
    channels-last memory: the same arithmetic, but cuDNN convolves without NCHW/NHWC transposes.
    """

    def __init__(
        self,
        in_channels: int,
        upsample_initial_channel: int,
        upsample_rates: list[int],
        upsample_kernel_sizes: list[int],
        resblock_kernel_sizes: list[int],
        resblock_dilation_sizes: list[list[int]],
        pre_conv_kernel_size: int,
        post_conv_kernel_size: int,
    ) -> None:
        super().__init__()
        self.conv_pre = WeightNormConv1d(
            in_channels, upsample_initial_channel, pre_conv_kernel_size, padding=_same_padding(pre_conv_kernel_size)
        )
        widths = [upsample_initial_channel // 2**i for i in range(len(upsample_rates) + 1)]
        self.ups = nn.ModuleList(
            WeightNormConvTranspose1d(c_in, c_out, k, stride=u, padding=(k - u) // 2)
            for c_in, c_out, u, k in zip(widths[:-1], widths[1:], upsample_rates, upsample_kernel_sizes)
        )
        self.resblocks = nn.ModuleList(
            ResBlock(width, k, dilations)
            for width in widths[1:]
            for k, dilations in zip(resblock_kernel_sizes, resblock_dilation_sizes)
        )
        self.resblocks_per_stage = len(resblock_kernel_sizes)
        self.conv_post = WeightNormConv1d(
            widths[-1], 1, post_conv_kernel_size, padding=_same_padding(post_conv_kernel_size)
        )
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x[:, :, None].contiguous(memory_format=torch.channels_last)
        x = self.conv_pre(x)
        for stage, upsample in enumerate(self.ups):
            x = upsample(F.silu(x))
            first = stage * self.resblocks_per_stage
            blocks = self.resblocks[first : first + self.resblocks_per_stage]
            summed = blocks[0](x)
            for block in blocks[1:]:
                summed = summed + block(x)
            x = summed / self.resblocks_per_stage
        wave = torch.tanh(self.conv_post(F.silu(x)))
        return wave[:, :, 0] if self.channels_last else wave


def _hz_to_slaney_mel(hz: float) -> float:
    if hz < SLANEY_LOG_START_HZ:
        return hz / SLANEY_HZ_PER_MEL
    return SLANEY_LOG_START_MEL + math.log(hz / SLANEY_LOG_START_HZ) / SLANEY_LOG_STEP


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = SLANEY_HZ_PER_MEL * mel
    logarithmic = SLANEY_LOG_START_HZ * torch.exp(SLANEY_LOG_STEP * (mel - SLANEY_LOG_START_MEL))
    return torch.where(mel >= SLANEY_LOG_START_MEL, logarithmic, linear)


def slaney_mel_filterbank(sample_rate: int, n_freqs: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular, area-normalised (Slaney) mel filters, [n_freqs, n_mels]; bins span 0..sample_rate//2."""
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_edges = torch.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2)
    edge_hz = _slaney_mel_to_hz(mel_edges)
    edge_gaps = edge_hz[1:] - edge_hz[:-1]
    offsets = edge_hz[None, :] - bin_hz[:, None]
    rising = -offsets[:, :-2] / edge_gaps[:-1]
    falling = offsets[:, 2:] / edge_gaps[1:]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return filters * (2.0 / (edge_hz[2:] - edge_hz[:-2]))[None, :]


class MagnitudeSpectrogram(nn.Module):
    """Wave [B, N] -> |STFT| [B, n_fft//2+1, N//hop]: reflect-padded so frame f is centred on sample f*hop."""

    def __init__(self, n_fft: int, win_length: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.padding = ((win_length - hop_length) // 2, (win_length - hop_length + 1) // 2)
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        padded = F.pad(wave[:, None], self.padding, mode="reflect")[:, 0]
        spec = torch.stft(
            padded, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True
        )
        return torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + MAGNITUDE_EPS)


class MelScale(nn.Module):
    """Linear spectrogram [B, n_freqs, F] -> mel spectrogram [B, n_mels, F] through the buffer `fb`."""

    def __init__(self, sample_rate: int, n_freqs: int, n_mels: int, f_min: float, f_max: float) -> None:
        super().__init__()
        self.register_buffer("fb", slaney_mel_filterbank(sample_rate, n_freqs, n_mels, f_min, f_max))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)


class LogMelSpectrogram(nn.Module):
    """Wave [B, N] at `sample_rate` -> natural-log mel [B, n_mels, N//hop], floored at 1e-5 before the log."""

    def __init__(
        self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int, f_min: float, f_max: float
    ) -> None:
        super().__init__()
        self.spectrogram = MagnitudeSpectrogram(n_fft, win_length, hop_length)
        self.mel_scale = MelScale(sample_rate, n_fft // 2 + 1, n_mels, f_min, f_max)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clamp(self.mel_scale(self.spectrogram(wave)), min=LOG_MEL_FLOOR))


class ADaMoSHiFiGAN(ModelMixin, ConfigMixin):
    """`music_vocoder`: log-mel [B, n_mels, F] -> waveform [B, 1, F*hop_length] at `sampling_rate`.

    Config keys are those of the published `config.json` (class `ADaMoSHiFiGANV1`); defaults are the
    published values. `num_mels` is the head's input width (= dims[-1]); `n_mels` the mel bins.
    `drop_path_rate` is training-only; one ConvNeXt kernel size and no noise template are supported,
    as published.
    """

    @register_to_config
    def __init__(
        self,
        input_channels: int = 128,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (128, 256, 384, 512),
        drop_path_rate: float = 0.0,
        kernel_sizes: Sequence[int] = (7,),
        upsample_rates: Sequence[int] = (4, 4, 2, 2, 2, 2, 2),
        upsample_kernel_sizes: Sequence[int] = (8, 8, 4, 4, 4, 4, 4),
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11, 13),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5), (1, 3, 5)),
        num_mels: int = 512,
        upsample_initial_channel: int = 1024,
        use_template: bool = False,
        pre_conv_kernel_size: int = 13,
        post_conv_kernel_size: int = 13,
        sampling_rate: int = 44100,
        n_fft: int = 2048,
        win_length: int = 2048,
        hop_length: int = 512,
        f_min: int = 40,
        f_max: int = 16000,
        n_mels: int = 128,
    ) -> None:
        super().__init__()
        if math.prod(upsample_rates) != hop_length:
            raise ValueError(f"hop_length: {hop_length} != prod(upsample_rates) = {math.prod(upsample_rates)}")
        if len(kernel_sizes) != 1:
            raise ValueError(f"kernel_sizes: exactly one ConvNeXt kernel size is supported, got {list(kernel_sizes)}")
        if use_template:
            raise ValueError("use_template: the noise-template variant is not supported")
        if len(depths) != len(dims):
            raise ValueError(f"depths: {len(depths)} stages but dims has {len(dims)}")
        if num_mels != dims[-1]:
            raise ValueError(f"num_mels: head input {num_mels} != backbone output dims[-1] = {dims[-1]}")
        if input_channels != n_mels:
            raise ValueError(f"input_channels: {input_channels} != n_mels = {n_mels}")
        if upsample_initial_channel % 2 ** len(upsample_rates) != 0:
            raise ValueError(
                f"upsample_initial_channel: {upsample_initial_channel} is halved {len(upsample_rates)} times, "
                f"so it must be a multiple of {2 ** len(upsample_rates)}"
            )
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError("resblock_dilation_sizes: need one dilation list per resblock kernel size")

        self.backbone = ConvNeXtBackbone(input_channels, list(depths), list(dims), kernel_sizes[0])
        self.head = HiFiGANHead(
            num_mels,
            upsample_initial_channel,
            list(upsample_rates),
            list(upsample_kernel_sizes),
            list(resblock_kernel_sizes),
            [list(d) for d in resblock_dilation_sizes],
            pre_conv_kernel_size,
            post_conv_kernel_size,
        )
        self.mel_transform = LogMelSpectrogram(sampling_rate, n_fft, win_length, hop_length, n_mels, f_min, f_max)
        self.eval()

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, n_mels, F] -> waveform [B, 1, F*hop_length]."""
        return self.head(self.backbone(mel))

    @torch.no_grad()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, n_mels, F] -> waveform [B, 1, F*hop_length], without autograd."""
        return self(mel)

    @torch.no_grad()
    def decode_channels(self, mel: torch.Tensor) -> torch.Tensor:
        """Multichannel log-mel [B, C, n_mels, F] -> waveform [B, C, F*hop_length], all channels in one batch."""
        batch, channels = mel.shape[:2]
        return self(mel.flatten(0, 1)).reshape(batch, channels, -1)

    def context_frames(self) -> int:
        """Mel frames on each side of a frame that can change its output samples (receptive_context_frames)."""
        return receptive_context_frames(self.config)

    @torch.no_grad()
    def decode_windowed(
        self,
        mel: torch.Tensor,
        window_frames: int,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        window_batch: int | None = None,
    ) -> torch.Tensor:
        """`decode(mel)` for log-mel [B, n_mels, F], computed over windows of `window_frames` frames.

        Windows overlap by `context_frames()` on each side and only their centres are kept, so every
        output sample sees the same inputs as in one whole decode: the result equals `decode` up to
        rounding, with memory bounded by the window and one window shape for any F. The windows of
        all B rows are stacked and decoded `window_batch` at a time (default: all at once); a short
        last group is filled up with copies of its first window, so every call has the one shape
        [window_batch, n_mels, window_frames] (one CUDA graph, one cuDNN algorithm search). `decode`
        runs one group ([G, n_mels, window_frames] -> [G, 1, window_frames * hop_length]); default
        `self.decode`.
        """
        run = decode if decode is not None else self.decode
        context = self.context_frames()
        if window_frames <= 2 * context:
            raise ValueError(f"window_frames: {window_frames} must exceed twice the context ({context} frames)")
        hop = self.config.hop_length
        total = mel.shape[-1]
        if total <= window_frames:
            return self.decode(mel)
        spans = overlapping_windows(total, window_frames, context)
        windows = torch.stack([mel[..., start : start + window_frames] for start, _, _ in spans], dim=1)
        waves = run_grouped(windows.flatten(0, 1), run, window_batch)  # rows: mel row-major, then window
        waves = waves.unflatten(0, (mel.shape[0], len(spans)))  # [B, W, 1, window * hop]
        pieces = [waves[:, index, :, (kept - start) * hop : (keep_to - start) * hop]
                  for index, (start, kept, keep_to) in enumerate(spans)]
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveform [B, N] at `sampling_rate` -> log-mel [B, n_mels, N//hop_length] (the encode direction)."""
        return self.mel_transform(wave)


def load_log_mel(folder: str | Path) -> LogMelSpectrogram:
    """The log-mel transform of the published `music_vocoder/` folder alone: built from its config
    (missing keys take ADaMoSHiFiGAN's defaults), its two buffers read from the weights file."""
    folder = Path(folder)
    config = {**{name: p.default for name, p in inspect.signature(ADaMoSHiFiGAN.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty},
              **ADaMoSHiFiGAN.load_config(folder)}
    log_mel = LogMelSpectrogram(config["sampling_rate"], config["n_fft"], config["win_length"], config["hop_length"],
                                config["n_mels"], config["f_min"], config["f_max"])
    prefix = "mel_transform."
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights:
        state = {key.removeprefix(prefix): weights.get_tensor(key) for key in weights.keys() if key.startswith(prefix)}
    log_mel.load_state_dict(state)
    return log_mel.eval()


def load_vocoder(folder: str | Path) -> ADaMoSHiFiGAN:
    """Load the published `music_vocoder/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    return ADaMoSHiFiGAN.from_pretrained(folder).eval()
