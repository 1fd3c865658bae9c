"""LivePortrait's five networks on the meta device, and the animation step the Director runs.

What it holds: the networks of KwaiVGI/LivePortrait (human model), rebuilt layer for layer from
its ``src/modules/`` (``util.py``, ``appearance_feature_extractor.py``, ``motion_extractor.py`` and
``convnextv2.py``, ``warping_network.py`` and ``dense_motion.py``, ``spade_generator.py``,
``stitching_retargeting_network.py``) with the published ``src/config/models.yaml``; the
inference flow follows ``src/live_portrait_wrapper.py``, ``src/live_portrait_pipeline.py`` and
``src/utils/camera.py``. There is no LivePortrait package to import, so the layers are written
out here; the attribute names are upstream's, so ``state_dict()`` keys are the checkpoints' keys
(``appearance_feature_extractor.pth`` etc.; the stitching file holds three state dicts, one per
entry of ``stitching_retargeting_module``).

What it assumes:

* dtype: upstream keeps fp32 weights and runs F, M, W and G under ``torch.autocast(float16)``
  (``flag_use_half_precision: True``); autocast has no meta backend, so :func:`build` makes fp16
  weights (the Director's deployment dtype) and the networks run fp16 activations. Where CUDA
  autocast would compute in fp32 the meta run is fp16: the dense-motion grids and heatmaps (fp32
  there because the keypoints are fp32), its mask softmax, ``exp`` in ``kp2gaussian``, ConvNeXt's
  layer norms, and the two ``grid_sample`` calls (promoted to fp32 by their fp32 grids). Those
  activations are half the bytes here that they are on the GPU. The keypoint arithmetic runs in
  fp32, as upstream floats the motion extractor's outputs.
* what the Director runs per slot is upstream's default inference path (relative motion,
  stitching on, lip-zero on, eye and lip retargeting off), with the driving frames as one batch
  where upstream loops frame by frame; the source is 256x256, the output 512x512.
* left out: training code, weight init, the ONNX and ``torch.compile`` paths, cropping and
  paste-back (image work on the CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm
from torch.overrides import TorchFunctionMode

NUM_KP = 21
NUM_BINS = 66
SIZE = 256

# src/config/models.yaml, model_params.stitching_retargeting_module_params
STITCHING_PARAMS = {
    "stitching": {"input_size": 126, "hidden_sizes": [128, 128, 64], "output_size": 65},
    "lip": {"input_size": 65, "hidden_sizes": [128, 128, 64], "output_size": 63},
    "eye": {"input_size": 66, "hidden_sizes": [256, 256, 128, 128, 64], "output_size": 63},
}


# ---- src/modules/util.py ------------------------------------------------------------------------


def make_coordinate_grid(spatial_size: tuple[int, int, int], ref: torch.Tensor) -> torch.Tensor:
    d, h, w = spatial_size
    x = 2 * (torch.arange(w, dtype=ref.dtype, device=ref.device) / (w - 1)) - 1
    y = 2 * (torch.arange(h, dtype=ref.dtype, device=ref.device) / (h - 1)) - 1
    z = 2 * (torch.arange(d, dtype=ref.dtype, device=ref.device) / (d - 1)) - 1
    yy = y.view(1, -1, 1).repeat(d, 1, w)
    xx = x.view(1, 1, -1).repeat(d, h, 1)
    zz = z.view(-1, 1, 1).repeat(1, h, w)
    return torch.cat([xx.unsqueeze_(3), yy.unsqueeze_(3), zz.unsqueeze_(3)], 3)


def kp2gaussian(kp: torch.Tensor, spatial_size: tuple[int, int, int], kp_variance: float):
    grid = make_coordinate_grid(spatial_size, kp)
    lead = kp.dim() - 1
    # upstream materialises the repeated grid ([bs, k, d, h, w, 3]); kept for its activation
    grid = grid.view((1,) * lead + grid.shape).repeat(*kp.shape[:lead], 1, 1, 1, 1)
    mean = kp.view(*kp.shape[:lead], 1, 1, 1, 3)
    return torch.exp(-0.5 * ((grid - mean) ** 2).sum(-1) / kp_variance)


class SameBlock2d(nn.Module):
    def __init__(self, in_features: int, out_features: int, lrelu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.ac = nn.LeakyReLU() if lrelu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ac(self.norm(self.conv(x)))


class DownBlock2d(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_features, affine=True)
        self.pool = nn.AvgPool2d(kernel_size=(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class DownBlock3d(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)
        self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.norm(self.conv(x))))


class UpBlock3d(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_features, out_features, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x, scale_factor=(1, 2, 2))
        return F.relu(self.norm(self.conv(out)))


class ResBlock3d(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_features, in_features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(in_features, in_features, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(in_features, affine=True)
        self.norm2 = nn.BatchNorm3d(in_features, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        out += x
        return out


class Encoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(
            DownBlock3d(
                in_features if i == 0 else min(max_features, block_expansion * (2**i)),
                min(max_features, block_expansion * (2 ** (i + 1))),
            )
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [x]
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class Decoder(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features) -> None:
        super().__init__()
        ups = []
        for i in reversed(range(num_blocks)):
            scale = 1 if i == num_blocks - 1 else 2
            ups.append(
                UpBlock3d(
                    scale * min(max_features, block_expansion * (2 ** (i + 1))),
                    min(max_features, block_expansion * (2**i)),
                )
            )
        self.up_blocks = nn.ModuleList(ups)
        self.out_filters = block_expansion + in_features
        self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_filters, affine=True)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        out = x.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), x.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features) -> None:
        super().__init__()
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class SPADE(nn.Module):
    def __init__(self, norm_nc: int, label_nc: int, nhidden: int = 128) -> None:
        super().__init__()
        self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, nhidden, kernel_size=3, padding=1), nn.ReLU()
        )
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.size()[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """norm_G 'spadespectralinstance': every conv is spectral-normed, as upstream.

    The legacy ``torch.nn.utils.spectral_norm`` is kept (not the parametrization) because it is
    what upstream uses: its keys (``weight_orig``, ``weight_u``, ``weight_v``) are the
    checkpoint's, and its pre-hook recomputes ``weight`` on every call and leaves it on the
    module, so each spectral-normed conv holds a second copy of its weight after a forward.
    """

    def __init__(self, fin: int, fout: int, label_nc: int) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, kernel_size=3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, kernel_size=3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, kernel_size=1, bias=False))
            self.norm_s = SPADE(fin, label_nc)
        self.norm_0 = SPADE(fin, label_nc)
        self.norm_1 = SPADE(fmiddle, label_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 2e-1))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 2e-1))
        return x_s + dx


class LayerNorm(nn.Module):
    """util.LayerNorm: channels_last uses F.layer_norm; channels_first normalises by hand."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.data_format = data_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


# ---- src/modules/convnextv2.py, motion_extractor.py ---------------------------------------------


class ConvNeXtBlock(nn.Module):
    """ConvNeXtV2 block; drop_path is 0 at inference (upstream's nn.Identity)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    def __init__(self, depths, dims, num_kp: int = NUM_KP, num_bins: int = NUM_BINS) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                    LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
                )
            )
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dims[i]) for _ in range(depths[i]))) for i in range(4)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc_kp = nn.Linear(dims[-1], 3 * num_kp)
        self.fc_scale = nn.Linear(dims[-1], 1)
        self.fc_pitch = nn.Linear(dims[-1], num_bins)
        self.fc_yaw = nn.Linear(dims[-1], num_bins)
        self.fc_roll = nn.Linear(dims[-1], num_bins)
        self.fc_t = nn.Linear(dims[-1], 3)
        self.fc_exp = nn.Linear(dims[-1], 3 * num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        x = self.norm(x.mean([-2, -1]))
        return {
            "pitch": self.fc_pitch(x),
            "yaw": self.fc_yaw(x),
            "roll": self.fc_roll(x),
            "t": self.fc_t(x),
            "exp": self.fc_exp(x),
            "scale": self.fc_scale(x),
            "kp": self.fc_kp(x),
        }


class MotionExtractor(nn.Module):
    def __init__(self, num_kp: int = NUM_KP) -> None:
        super().__init__()
        # convnextv2_tiny
        self.detector = ConvNeXtV2(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], num_kp=num_kp)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.detector(x)


# ---- src/modules/appearance_feature_extractor.py ------------------------------------------------


class AppearanceFeatureExtractor(nn.Module):
    def __init__(
        self,
        image_channel: int = 3,
        block_expansion: int = 64,
        num_down_blocks: int = 2,
        max_features: int = 512,
        reshape_channel: int = 32,
        reshape_depth: int = 16,
        num_resblocks: int = 6,
    ) -> None:
        super().__init__()
        self.reshape_channel = reshape_channel
        self.reshape_depth = reshape_depth
        self.first = SameBlock2d(image_channel, block_expansion)
        chans = [min(max_features, block_expansion * (2**i)) for i in range(num_down_blocks + 1)]
        self.down_blocks = nn.ModuleList(
            DownBlock2d(chans[i], chans[i + 1]) for i in range(num_down_blocks)
        )
        self.second = nn.Conv2d(chans[-1], max_features, kernel_size=1, stride=1)
        self.resblocks_3d = nn.Sequential()
        for i in range(num_resblocks):
            self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))

    def forward(self, source_image: torch.Tensor) -> torch.Tensor:
        out = self.first(source_image)  # Bx64x256x256
        for block in self.down_blocks:
            out = block(out)
        out = self.second(out)  # Bx512x64x64
        bs, _, h, w = out.shape
        f_s = out.view(bs, self.reshape_channel, self.reshape_depth, h, w)  # Bx32x16x64x64
        return self.resblocks_3d(f_s)


# ---- src/modules/dense_motion.py, warping_network.py --------------------------------------------


class DenseMotionNetwork(nn.Module):
    def __init__(
        self,
        block_expansion: int,
        num_blocks: int,
        max_features: int,
        num_kp: int,
        feature_channel: int,
        reshape_depth: int,
        compress: int,
        estimate_occlusion_map: bool = True,
    ) -> None:
        super().__init__()
        self.hourglass = Hourglass(
            block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features
        )
        self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
        self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
        self.norm = nn.BatchNorm3d(compress, affine=True)
        self.num_kp = num_kp
        self.occlusion = (
            nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
            if estimate_occlusion_map
            else None
        )

    def create_sparse_motions(self, feature, kp_driving, kp_source):
        bs, _, d, h, w = feature.shape
        identity = make_coordinate_grid((d, h, w), ref=kp_source).view(1, 1, d, h, w, 3)
        coordinate_grid = identity - kp_driving.view(bs, self.num_kp, 1, 1, 1, 3)
        driving_to_source = coordinate_grid + kp_source.view(bs, self.num_kp, 1, 1, 1, 3)
        identity = identity.repeat(bs, 1, 1, 1, 1, 1)
        return torch.cat([identity, driving_to_source], dim=1)  # (bs, 1+k, d, h, w, 3)

    def create_deformed_feature(self, feature, sparse_motions):
        bs, _, d, h, w = feature.shape
        k1 = self.num_kp + 1
        repeated = feature.unsqueeze(1).unsqueeze(1).repeat(1, k1, 1, 1, 1, 1, 1)
        repeated = repeated.view(bs * k1, -1, d, h, w)
        motions = sparse_motions.view(bs * k1, d, h, w, -1)
        deformed = F.grid_sample(repeated, motions, align_corners=False)
        return deformed.view(bs, k1, -1, d, h, w)  # (bs, 1+k, c, d, h, w)

    def create_heatmap_representations(self, feature, kp_driving, kp_source):
        spatial_size = feature.shape[3:]
        heatmap = kp2gaussian(kp_driving, spatial_size, 0.01) - kp2gaussian(
            kp_source, spatial_size, 0.01
        )
        zeros = torch.zeros(
            heatmap.shape[0], 1, *spatial_size, dtype=heatmap.dtype, device=heatmap.device
        )
        return torch.cat([zeros, heatmap], dim=1).unsqueeze(2)  # (bs, 1+k, 1, d, h, w)

    def forward(self, feature, kp_driving, kp_source) -> dict[str, torch.Tensor]:
        bs, _, d, h, w = feature.shape
        feature = F.relu(self.norm(self.compress(feature)))  # (bs, 4, 16, 64, 64)
        sparse_motion = self.create_sparse_motions(feature, kp_driving, kp_source)
        deformed = self.create_deformed_feature(feature, sparse_motion)
        heatmap = self.create_heatmap_representations(deformed, kp_driving, kp_source)
        inp = torch.cat([heatmap, deformed], dim=2).view(bs, -1, d, h, w)  # (bs, 110, ...)
        prediction = self.hourglass(inp)
        mask = F.softmax(self.mask(prediction), dim=1).unsqueeze(2)
        sparse_motion = sparse_motion.permute(0, 1, 5, 2, 3, 4)
        deformation = (sparse_motion * mask).sum(dim=1).permute(0, 2, 3, 4, 1)  # (bs, d, h, w, 3)
        out = {"mask": mask.squeeze(2), "deformation": deformation}
        if self.occlusion is not None:
            pred = prediction.view(bs, -1, h, w)
            out["occlusion_map"] = torch.sigmoid(self.occlusion(pred))  # Bx1x64x64
        return out


class WarpingNetwork(nn.Module):
    def __init__(
        self,
        num_kp: int = NUM_KP,
        block_expansion: int = 64,
        max_features: int = 512,
        num_down_blocks: int = 2,
        reshape_channel: int = 32,
        estimate_occlusion_map: bool = True,
        dense_motion_params: dict | None = None,
    ) -> None:
        super().__init__()
        params = dense_motion_params or {
            "block_expansion": 32,
            "max_features": 1024,
            "num_blocks": 5,
            "reshape_depth": 16,
            "compress": 4,
        }
        self.dense_motion_network = DenseMotionNetwork(
            num_kp=num_kp,
            feature_channel=reshape_channel,
            estimate_occlusion_map=estimate_occlusion_map,
            **params,
        )
        chans = block_expansion * (2**num_down_blocks)
        self.third = SameBlock2d(max_features, chans, lrelu=True)
        self.fourth = nn.Conv2d(chans, chans, kernel_size=1, stride=1)

    def forward(self, feature_3d, kp_driving, kp_source) -> dict[str, torch.Tensor]:
        dense = self.dense_motion_network(feature_3d, kp_driving, kp_source)
        out = F.grid_sample(feature_3d, dense["deformation"], align_corners=False)
        bs, c, d, h, w = out.shape  # Bx32x16x64x64
        out = self.fourth(self.third(out.view(bs, c * d, h, w)))  # Bx256x64x64
        occlusion_map = dense.get("occlusion_map")
        if occlusion_map is not None:
            out = out * occlusion_map
        return {"occlusion_map": occlusion_map, "deformation": dense["deformation"], "out": out}


# ---- src/modules/spade_generator.py -------------------------------------------------------------


class SPADEDecoder(nn.Module):
    def __init__(
        self,
        upscale: int = 2,
        max_features: int = 512,
        block_expansion: int = 64,
        out_channels: int = 64,
        num_down_blocks: int = 2,
    ) -> None:
        super().__init__()
        ic = min(max_features, block_expansion * (2**num_down_blocks))  # 256
        self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
        for i in range(6):
            self.add_module(f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, ic))
        self.up_0 = SPADEResnetBlock(2 * ic, ic, ic)
        self.up_1 = SPADEResnetBlock(ic, out_channels, ic)
        self.up = nn.Upsample(scale_factor=2)
        if upscale <= 1:
            self.conv_img = nn.Conv2d(out_channels, 3, 3, padding=1)
        else:
            self.conv_img = nn.Sequential(
                nn.Conv2d(out_channels, 3 * 2 * 2, kernel_size=3, padding=1),
                nn.PixelShuffle(upscale_factor=2),
            )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        seg = feature  # Bx256x64x64
        x = self.fc(feature)  # Bx512x64x64
        for i in range(6):
            x = getattr(self, f"G_middle_{i}")(x, seg)
        x = self.up_0(self.up(x), seg)  # Bx256x128x128
        x = self.up_1(self.up(x), seg)  # Bx64x256x256
        return torch.sigmoid(self.conv_img(F.leaky_relu(x, 2e-1)))  # Bx3x512x512


# ---- src/modules/stitching_retargeting_network.py -----------------------------------------------


class StitchingRetargetingNetwork(nn.Module):
    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        sizes = [input_size, *hidden_sizes]
        for i in range(len(hidden_sizes)):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(hidden_sizes[-1], output_size))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LivePortrait(nn.Module):
    """The five networks as LivePortraitWrapper holds them (F, M, W, G and S with R_lip, R_eye).

    ``stitching_retargeting_module`` is a ModuleDict where upstream's ``load_model`` returns a
    plain dict of the three MLPs: same keys and lookups, but its parameters count as the model's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.appearance_feature_extractor = AppearanceFeatureExtractor()
        self.motion_extractor = MotionExtractor()
        self.warping_module = WarpingNetwork()
        self.spade_generator = SPADEDecoder()
        self.stitching_retargeting_module = nn.ModuleDict(
            {name: StitchingRetargetingNetwork(**p) for name, p in STITCHING_PARAMS.items()}
        )


class _FloatFactoriesIn(TorchFunctionMode):
    """Tensor factories called without a dtype make ``dtype`` (this thread only)."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full})

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)


def build(dtype: torch.dtype = torch.float16) -> LivePortrait:
    """LivePortrait on the meta device, in eval mode, weights in ``dtype`` (fp16 by default).

    The parameters are made in ``dtype`` rather than made in fp32 and converted, so that an
    allocation capture of the build sees each weight once, as loading an fp16 model would place it.
    """
    with torch.device("meta"), _FloatFactoriesIn(dtype):
        model = LivePortrait()
    return model.eval().requires_grad_(False)


# ---- src/utils/camera.py and the keypoint arithmetic of the wrapper / pipeline ------------------


def headpose_pred_to_degree(pred: torch.Tensor) -> torch.Tensor:
    if pred.ndim > 1 and pred.shape[1] == NUM_BINS:
        idx = torch.arange(NUM_BINS, dtype=pred.dtype, device=pred.device)
        return torch.sum(F.softmax(pred, dim=1) * idx, dim=1) * 3 - 97.5
    return pred


def get_rotation_matrix(pitch_: torch.Tensor, yaw_: torch.Tensor, roll_: torch.Tensor):
    x, y, z = (a / 180 * math.pi for a in (pitch_, yaw_, roll_))
    x, y, z = (a.unsqueeze(1) if a.ndim == 1 else a for a in (x, y, z))
    bs = x.shape[0]
    ones = torch.ones([bs, 1], dtype=x.dtype, device=x.device)
    zeros = torch.zeros([bs, 1], dtype=x.dtype, device=x.device)
    rot_x = torch.cat(
        [ones, zeros, zeros, zeros, torch.cos(x), -torch.sin(x), zeros, torch.sin(x), torch.cos(x)],
        dim=1,
    ).reshape([bs, 3, 3])
    rot_y = torch.cat(
        [torch.cos(y), zeros, torch.sin(y), zeros, ones, zeros, -torch.sin(y), zeros, torch.cos(y)],
        dim=1,
    ).reshape([bs, 3, 3])
    rot_z = torch.cat(
        [torch.cos(z), -torch.sin(z), zeros, torch.sin(z), torch.cos(z), zeros, zeros, zeros, ones],
        dim=1,
    ).reshape([bs, 3, 3])
    return (rot_z @ rot_y @ rot_x).permute(0, 2, 1)


def _dtype(model: LivePortrait) -> torch.dtype:
    return model.spade_generator.fc.weight.dtype


def get_kp_info(model: LivePortrait, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """LivePortraitWrapper.get_kp_info with flag_refine_info: outputs floated, poses in degrees."""
    info = {k: v.float() for k, v in model.motion_extractor(x).items()}
    bs = info["kp"].shape[0]
    for k in ("pitch", "yaw", "roll"):
        info[k] = headpose_pred_to_degree(info[k])[:, None]  # Bx1
    info["kp"] = info["kp"].reshape(bs, -1, 3)
    info["exp"] = info["exp"].reshape(bs, -1, 3)
    return info


def transform_keypoint(kp_info: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eqn. 2: s * (x_c R + exp) + t, with tz dropped."""
    kp = kp_info["kp"]
    pitch, yaw, roll = (headpose_pred_to_degree(kp_info[k]) for k in ("pitch", "yaw", "roll"))
    bs, num_kp = kp.shape[0], kp.shape[1]
    rot = get_rotation_matrix(pitch, yaw, roll)
    out = kp.view(bs, num_kp, 3) @ rot + kp_info["exp"].view(bs, num_kp, 3)
    out *= kp_info["scale"][..., None]
    out[:, :, 0:2] += kp_info["t"][:, None, 0:2]
    return out


def _mlp(model: LivePortrait, name: str, feat: torch.Tensor) -> torch.Tensor:
    # the MLPs hold the deployment dtype; upstream runs them in fp32 outside autocast
    return model.stitching_retargeting_module[name](feat.to(_dtype(model))).float()


def stitching(model: LivePortrait, kp_source: torch.Tensor, kp_driving: torch.Tensor):
    bs, num_kp = kp_source.shape[:2]
    new = kp_driving.clone()
    delta = _mlp(model, "stitching", torch.cat([kp_source.view(bs, -1), new.view(bs, -1)], 1))
    new += delta[..., : 3 * num_kp].reshape(bs, num_kp, 3)
    new[..., :2] += delta[..., 3 * num_kp : 3 * num_kp + 2].reshape(bs, 1, 2)
    return new


def warp_decode(model: LivePortrait, feature_3d, kp_source, kp_driving) -> torch.Tensor:
    """W then G, as LivePortraitWrapper.warp_decode; the output is floated as upstream does."""
    dtype = _dtype(model)
    ret = model.warping_module(
        feature_3d, kp_driving=kp_driving.to(dtype), kp_source=kp_source.to(dtype)
    )
    return model.spade_generator(feature=ret["out"]).float()


def animate(model: LivePortrait, *, frames: int = 16, size: int = SIZE) -> torch.Tensor:
    """One source portrait animated by ``frames`` driving frames at once: ``[frames, 3, 512, 512]``.

    The source's appearance volume and keypoints are extracted once; the driving frames go through
    the motion extractor, the relative-motion keypoint transform, lip-zero and stitching (upstream's
    defaults) and then ``warp_decode`` as one batch. Inputs are meta tensors of the real shapes.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if size != SIZE:
        raise ValueError(f"LivePortrait's networks take {SIZE}x{SIZE} crops, got size={size!r}")
    dtype = _dtype(model)
    meta = {"device": "meta", "dtype": dtype}
    with torch.no_grad():
        source = torch.empty(1, 3, size, size, **meta)
        driving = torch.empty(frames, 3, size, size, **meta)

        # source: x_s_info, R_s, f_s, x_s (LivePortraitPipeline.execute, before the loop)
        x_s_info = get_kp_info(model, source)
        x_c_s = x_s_info["kp"]
        r_s = get_rotation_matrix(x_s_info["pitch"], x_s_info["yaw"], x_s_info["roll"])
        f_s = model.appearance_feature_extractor(source)  # 1x32x16x64x64
        x_s = transform_keypoint(x_s_info)
        # flag_lip_zero: R_lip(x_s; c_s,lip, 0); the ratio comes from landmarks on the CPU
        lip_ratio = torch.zeros(1, 2, device="meta")
        lip_delta = _mlp(model, "lip", torch.cat([x_s.view(1, -1), lip_ratio], dim=1))

        # driving frames, batched; frame 0 of the batch is the relative-motion anchor
        x_d_info = get_kp_info(model, driving)
        r_d = get_rotation_matrix(x_d_info["pitch"], x_d_info["yaw"], x_d_info["roll"])
        r_new = (r_d @ r_d[:1].permute(0, 2, 1)) @ r_s
        delta_new = x_s_info["exp"] + (x_d_info["exp"] - x_d_info["exp"][:1])
        scale_new = x_s_info["scale"] * (x_d_info["scale"] / x_d_info["scale"][:1])
        t_new = x_s_info["t"] + (x_d_info["t"] - x_d_info["t"][:1])
        t_new[..., 2].fill_(0)
        x_d_new = scale_new[..., None] * (x_c_s @ r_new + delta_new) + t_new[:, None, :]

        x_s_batch = x_s.expand(frames, -1, -1)
        x_d_new = stitching(model, x_s_batch, x_d_new) + lip_delta.reshape(-1, NUM_KP, 3)
        return warp_decode(model, f_s.expand(frames, -1, -1, -1, -1), x_s_batch, x_d_new)
