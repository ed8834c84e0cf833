"""A compact Diffusion Transformer (DiT, Peebles & Xie 2023) conditioned on the K-Flow scale ``k``.

Differences from the original DiT:

* the *k-embedding* (sinusoidal features of ``k in [0, 1]`` followed by an MLP) replaces the timestep
  embedding;
* the class embedding has one extra row, the *null class* (index ``num_classes``), used for label dropout
  during training, for classifier-free guidance and for the paper's class-condition drop;
* the output is the endpoint prediction ``x1_hat`` by default (K-Flow's localisation: the velocity is then
  ``T^-1(dmu * (T x1_hat - T x_0))`` and is formed by :mod:`kflow.path`, not by the network); ``prediction=
  "velocity"`` is only a label carried for the task, the network itself is the same;
* no learned sigma, and guidance is applied to every output channel.

The model follows the toolkit-wide signature ``model(x_k, k, **cond)`` with ``cond = {"y": labels}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig", "build_dit", "k_embedding", "sincos_pos_embed_2d"]


# ----------------------------------------------------------------------------------------------- helpers
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MAE / DiT style).

    Args:
        dim: embedding width, divisible by 4.
        grid_h: number of patch rows.
        grid_w: number of patch columns.

    Returns:
        ``(grid_h * grid_w, dim)`` float64 array, rows in raster order.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos 2-D position embedding needs a width divisible by 4, got {dim}")
    gy, gx = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # half of the channels encode the row, half the column
    return np.concatenate([one_axis(gy), one_axis(gx)], axis=1)


def k_embedding(k: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the scale ``k``.

    ``k`` lives in ``[0, 1]``; it is multiplied by ``scale`` so the frequencies span the same range as the
    integer timesteps of the original DiT (otherwise the high-frequency features would be nearly constant).

    Args:
        k: ``(B,)`` scales.
        dim: feature width.
        max_period: the longest period of the features.
        scale: multiplier applied to ``k``.

    Returns:
        ``(B, dim)`` features.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=k.device) / half)
    args = (k.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------------------ blocks
class KEmbedder(nn.Module):
    """Sinusoidal k-features followed by a two-layer MLP: ``(B,) -> (B, hidden)``."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.mlp(k_embedding(k, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv: ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero modulation (identity at initialisation)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, N, D)`` tokens, c ``(B, D)`` conditioning. Returns ``(B, N, D)``."""
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    """adaLN + linear projection of each token to a ``patch x patch x C`` patch (zero-initialised)."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------------------------- model
@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiT` (stored in checkpoints so a model can be rebuilt)."""

    in_channels: int = 1
    input_size: int = 32
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    prediction: str = "endpoint"


#: named sizes; ``S`` and ``B`` are the DiT paper's, ``tiny``/``small`` are CPU sizes.
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),
    "small": dict(hidden_size=192, depth=6, num_heads=6),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
}


class DiT(nn.Module):
    """Diffusion Transformer over ``(B, C, H, W)`` inputs conditioned on ``k`` and an optional class label.

    Args:
        in_channels: channels ``C`` of the input (and output).
        input_size: spatial size ``H = W`` (an int) or ``(H, W)``; both must be divisible by ``patch_size``.
        patch_size: side of the square patches.
        hidden_size: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / token width.
        num_classes: number of classes (0 = unconditional). Index ``num_classes`` is the null class.
        prediction: ``"endpoint"`` (the output is ``x1_hat``) or ``"velocity"``; a label for the task.
    """

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        prediction: str = "endpoint",
    ):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"input size {h}x{w} is not divisible by the patch size {patch_size}")
        if prediction not in ("endpoint", "velocity"):
            raise ValueError(f"prediction must be 'endpoint' or 'velocity', got {prediction!r}")
        self.config = DiTConfig(in_channels, h if h == w else (h, w), patch_size, hidden_size, depth,
                                num_heads, mlp_ratio, num_classes, prediction)
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.prediction = prediction
        self.grid = (h // patch_size, w // patch_size)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.k_embedder = KEmbedder(hidden_size)
        # one extra row: the null class (label dropout / guidance / class-condition drop)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        pos = sincos_pos_embed_2d(hidden_size, *self.grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label index of the null (unconditional) class."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, and zero adaLN / output layers (adaLN-Zero)."""
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.k_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.k_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts gated off, the final projection starts at zero
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------------------------------ forward
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C) -> (B, C, H, W)``."""
        p, c = self.patch_size, self.in_channels
        gh, gw = self.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def condition(self, k: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Conditioning vector ``(B, D)`` from ``k`` ``(B,)`` (or a scalar) and labels ``y`` ``(B,)``.

        ``y=None`` (or entries equal to :attr:`null_class`) means unconditional.
        """
        k = torch.as_tensor(k, device=self.pos_embed.device)
        if k.ndim == 0:
            k = k.expand(batch)
        c = self.k_embedder(k.reshape(batch))
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((batch,), self.null_class, dtype=torch.long, device=c.device)
            y = torch.as_tensor(y, device=c.device).long()
            if y.min() < 0 or y.max() > self.null_class:
                raise ValueError(f"labels must be in [0, {self.null_class}] ({self.null_class} = null class), "
                                 f"got range [{int(y.min())}, {int(y.max())}]")
            c = c + self.y_embedder(y)
        return c

    def forward(self, x_k: torch.Tensor, k: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the endpoint ``x1_hat`` (or the velocity, per :attr:`prediction`).

        Args:
            x_k: ``(B, C, H, W)`` state at scale ``k``.
            k: ``(B,)`` scales in ``[0, 1]`` (a scalar is broadcast).
            y: ``(B,)`` integer labels, the null class or ``None`` for unconditional.

        Returns:
            ``(B, C, H, W)`` prediction, same dtype as the parameters.
        """
        if x_k.ndim != 4 or x_k.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x_k.shape)}")
        b = x_k.shape[0]
        dtype = self.x_embedder.weight.dtype
        tok = self.x_embedder(x_k.to(dtype)).flatten(2).transpose(1, 2)
        if tok.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"input spatial size {tuple(x_k.shape[2:])} does not match the model's "
                             f"{self.grid[0] * self.patch_size}x{self.grid[1] * self.patch_size}")
        tok = tok + self.pos_embed.to(dtype)
        c = self.condition(k, y, b).to(dtype)
        for blk in self.blocks:
            tok = blk(tok, c)
        return self.unpatchify(self.final_layer(tok, c))

    def forward_with_cfg(self, x_k: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: ``out_null + s * (out_y - out_null)`` in one doubled batch.

        For the endpoint prediction this equals guidance on the velocity, because K-Flow's velocity
        ``T^-1(dmu * (T x1_hat - T x_0))`` is affine in ``x1_hat`` with the same ``x_0`` for both branches.

        Args:
            x_k: ``(B, C, H, W)``.
            k: ``(B,)`` or scalar.
            y: ``(B,)`` labels (entries equal to the null class stay unconditional).
            cfg_scale: guidance scale ``s`` (1 = plain conditional).

        Returns:
            ``(B, C, H, W)`` guided prediction.
        """
        if self.y_embedder is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes > 0)")
        if cfg_scale == 1.0:
            return self.forward(x_k, k, y)
        b = x_k.shape[0]
        k = torch.as_tensor(k, device=x_k.device)
        k = k.expand(b) if k.ndim == 0 else k
        y = torch.as_tensor(y, device=x_k.device).long()
        out = self.forward(torch.cat([x_k, x_k]), torch.cat([k, k]),
                           torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out[:b], out[b:]
        return uncond + cfg_scale * (cond - uncond)


def build_dit(preset: str | None = None, **kwargs) -> DiT:
    """Build a :class:`DiT` from a preset name (see :data:`DIT_PRESETS`) and explicit overrides."""
    params: dict = {}
    if preset is not None:
        if preset not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
        params.update(DIT_PRESETS[preset])
    params.update({k: v for k, v in kwargs.items() if v is not None})
    return DiT(**params)

