"""FLUX.1 Tools and Kontext: the image conditioning of the Kontext, Fill and Canny/Depth models.

Two ways an image conditions the transformer (BFL `sampling.py: denoise`):
* along the sequence (Kontext): reference latents, packed, are appended to the noisy image tokens with position ids
  whose first axis is 1; they are not denoised, only the generated tokens are integrated;
* along the features (Fill, Canny, Depth): per-token channels concatenated to the noisy tokens, so the model's
  img_in takes 64 + 320 (Fill: masked-image latent + the mask folded 8x8) or 64 + 64 (control-image latent).
Latents here are scaled (model-space) latents, images (B, 3, H, W) in [-1, 1] unless said otherwise.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .sampling import check_image_size, image_ids, pack

# (width, height) Kontext was trained at (BFL util.py); references are resized to the one closest in aspect ratio.
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]  # fmt: skip
LATENT_TOKEN_CHANNELS = 64  # 16 latent channels x 2 x 2 patch
MASK_FOLD = 8  # pixels per latent cell along each axis: the mask is folded 8x8 into 64 channels


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution closest to this aspect ratio, as BFL's prepare_kontext picks it."""
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def resize_images(images: Tensor, width: int, height: int) -> Tensor:
    """(B, H, W, C) in [0, 1] -> (B, height, width, C): antialiased bicubic (BFL uses PIL's Lanczos)."""
    if images.shape[1:3] == (height, width):
        return images
    x = F.interpolate(images.movedim(-1, 1).float(), size=(height, width), mode="bicubic", antialias=True)
    return x.clamp(0, 1).movedim(1, -1)


@dataclass
class ImageCond:
    """Image conditioning beside the prompt, shared by the positive and negative passes."""

    channels: Tensor | None = None  # (B, Li, C) features concatenated to the noisy tokens (Fill 320, Canny/Depth 64)
    tokens: Tensor | None = None  # (B, Lr, 64) reference tokens appended to the sequence (Kontext)
    token_ids: Tensor | None = None  # (1, Lr, 3) their position ids, first axis 1

    def prepared(self, in_channels: int, latent_height: int, latent_width: int, device) -> "ImageCond":
        """Checked against the model's input width and the latent size, on the model's device."""
        extra = in_channels - LATENT_TOKEN_CHANNELS
        have = 0 if self.channels is None else self.channels.shape[-1]
        if have != extra:
            raise ValueError(_channel_advice(in_channels, have))
        tokens = (latent_height // 2) * (latent_width // 2)
        if self.channels is not None and self.channels.shape[1] != tokens:
            raise ValueError(
                f"the conditioning image has {self.channels.shape[1]} latent tokens but the latent to sample has "
                f"{tokens} ({latent_width * 8}x{latent_height * 8} px): give both the same size (use the latent output "
                "of the Fill/Control conditioning node, or resize the image)"
            )
        if self.tokens is not None and self.channels is not None:
            raise ValueError(
                "Kontext reference images cannot be combined with a Fill/Canny/Depth model: their tokens have no "
                "mask or control channels. Use flux1-kontext-dev for references."
            )
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageCond(move(self.channels), move(self.tokens), move(self.token_ids))

    def model_input(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Noisy tokens (B, Li, 64) and their ids -> the transformer's img and img_ids."""
        if self.channels is not None:
            x = torch.cat((x, _to_batch(self.channels, x.shape[0]).to(x.dtype)), dim=-1)
        if self.tokens is not None:
            x = torch.cat((x, _to_batch(self.tokens, x.shape[0]).to(x.dtype)), dim=1)
            ids = torch.cat((ids, self.token_ids), dim=1)
        return x, ids


def _channel_advice(in_channels: int, have: int) -> str:
    wants = {
        LATENT_TOKEN_CHANNELS: "a plain model (dev, schnell, Kontext) takes no Fill or control image: use "
        "flux1-fill-dev for inpainting, flux1-canny-dev / flux1-depth-dev for a control image",
        384: "this is a Fill model (flux1-fill-dev, 384 input channels): it needs an image and a mask "
        "(Flux Fill Conditioning, or generate(init_image=..., mask=...))",
        128: "this is a Canny/Depth model (128 input channels): it needs a control image "
        "(Flux Control Conditioning, or generate(control_image=...))",
    }
    given = {0: "no image conditioning", 320: "a Fill image and mask", 64: "a control image"}.get(have, f"{have} channels")
    return f"{wants.get(in_channels, f'the model takes {in_channels} input channels')}; got {given}"


def _to_batch(t: Tensor, batch: int) -> Tensor:
    """Repeat a conditioning batch over the sampled batch (several copies when cfg runs both prompts at once)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"conditioning images have batch {t.shape[0]}, which does not divide the latent batch {batch}")
    return t.repeat(batch // t.shape[0], *[1] * (t.ndim - 1))


# -- Kontext --------------------------------------------------------------------------------------------------
def reference_ids(latent_sizes: list[tuple[int, int]]) -> Tensor:
    """(1, Lr, 3) ids of reference latents of these (h, w): first axis 1, each on its own (row, col) grid.

    The first sits at the origin as in BFL; each further one is placed beside the ones before (to the right when
    that keeps the layout squarer, else below), as ComfyUI's "offset" method, so no two share a position.
    """
    parts, height, width = [], 0, 0
    for h, w in latent_sizes:
        row, col = (0, width) if h + height > w + width else (height, 0)
        ids = image_ids(h, w, axis0=1.0).clone()
        ids[..., 1] += (row + 1) // 2  # latent cells -> packed tokens, rounded as ComfyUI
        ids[..., 2] += (col + 1) // 2
        parts.append(ids)
        height, width = max(height, h + row), max(width, w + col)
    return torch.cat(parts, dim=1)


def kontext_cond(references: list[Tensor]) -> ImageCond:
    """Reference latents (each (B or 1, 16, h, w), any size) -> the sequence conditioning of Kontext."""
    if not references:
        raise ValueError("no reference latents given")
    tokens = [pack(r) for r in references]
    batch = max(t.shape[0] for t in tokens)
    tokens = torch.cat([_to_batch(t, batch) for t in tokens], dim=1)
    return ImageCond(tokens=tokens, token_ids=reference_ids([tuple(r.shape[-2:]) for r in references]))


# -- Fill -----------------------------------------------------------------------------------------------------
def check_mask(mask: Tensor, image_height: int, image_width: int) -> None:
    if mask.ndim != 3 or mask.shape[1:] != (image_height, image_width):
        raise ValueError(
            f"the mask is {'x'.join(map(str, mask.shape[1:][::-1])) if mask.ndim == 3 else tuple(mask.shape)} but the "
            f"image is {image_width}x{image_height}: the mask must be (B, H, W) at the image's size (white = repaint)"
        )


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] with the masked pixels set to 0 (mid grey), as BFL's prepare_fill."""
    check_mask(mask, *image.shape[-2:])
    return image * (1 - mask[:, None].to(image))


def fold_mask(mask: Tensor) -> Tensor:
    """(B, H, W) pixel mask -> (B, 64, H/8, W/8): each latent cell gets its 8x8 pixels as channels (row-major)."""
    return rearrange(mask, "b (h ph) (w pw) -> b (ph pw) h w", ph=MASK_FOLD, pw=MASK_FOLD)


def fill_cond(masked_latent: Tensor, mask: Tensor) -> ImageCond:
    """The Fill model's channels: packed masked-image latent (64) then the packed folded mask (256)."""
    check_mask(mask, masked_latent.shape[-2] * MASK_FOLD, masked_latent.shape[-1] * MASK_FOLD)
    folded = fold_mask(mask.to(masked_latent))
    batch = max(masked_latent.shape[0], folded.shape[0])
    return ImageCond(channels=torch.cat((_to_batch(pack(masked_latent), batch), _to_batch(pack(folded), batch)), -1))


def outpaint_pad(
    images: Tensor, left: int, top: int, right: int, bottom: int, feathering: int = 0
) -> tuple[Tensor, Tensor]:
    """(B, H, W, C) in [0, 1] -> the image padded with mid grey, and the (B, H', W') mask: 1 on the new border.

    With `feathering`, original pixels within that distance of a padded side get a mask fading (quadratically, as
    ComfyUI's ImagePadForOutpaint) from 1 at the edge to 0 inside, so the seam is repainted too.
    """
    if min(left, top, right, bottom, feathering) < 0:
        raise ValueError("padding and feathering must be >= 0 pixels")
    b, h, w, c = images.shape
    padded = F.pad(images.movedim(-1, 1), (left, right, top, bottom), value=0.5).movedim(1, -1)
    mask = torch.ones(b, h + top + bottom, w + left + right)
    inner = torch.zeros(h, w)
    if feathering:
        ys, xs = torch.arange(h)[:, None].float(), torch.arange(w)[None, :].float()
        inf = torch.tensor(float("inf"))
        distance = torch.minimum(
            torch.minimum(ys if top else inf, (h - 1 - ys) if bottom else inf),
            torch.minimum(xs if left else inf, (w - 1 - xs) if right else inf),
        )
        inner = ((feathering - distance) / feathering).clamp(min=0) ** 2
    mask[:, top : top + h, left : left + w] = inner
    return padded, mask


# -- Canny / Depth --------------------------------------------------------------------------------------------
def control_cond(control_latent: Tensor) -> ImageCond:
    """The Canny/Depth model's channels: the packed latent of the control image (64)."""
    return ImageCond(channels=pack(control_latent))


# -- from images, as the library's generate() takes them --------------------------------------------------------
def output_size(
    width: int | None, height: int | None, reference_images: list[Tensor] | None, kontext_resize: bool = True
) -> tuple[int, int]:
    """The size to generate: as given, else the first reference's (after the Kontext resize), else 1024."""
    if reference_images:
        ref_width, ref_height = reference_images[0].shape[2], reference_images[0].shape[1]
        default = kontext_size(ref_width, ref_height) if kontext_resize else (ref_width // 16 * 16, ref_height // 16 * 16)
    else:
        default = (1024, 1024)
    return width or default[0], height or default[1]


def image_cond_from_images(
    ae,
    width: int,
    height: int,
    image: Tensor | None = None,  # (B, H, W, 3) in [0, 1]: the Fill image
    mask: Tensor | None = None,  # (B, H, W) in [0, 1], 1 = repaint
    control_image: Tensor | None = None,  # (B, H, W, 3) in [0, 1]: resized to width x height
    reference_images: list[Tensor] | None = None,  # each (B, H, W, 3) in [0, 1]
    kontext_resize: bool = True,
) -> ImageCond | None:
    """Encode the conditioning images with the AE and build the conditioning (None when there is none)."""
    if mask is not None and image is None:
        raise ValueError("a mask needs the image it masks: pass init_image (the image to inpaint) with mask")
    if mask is not None and control_image is not None:
        raise ValueError("Fill (mask) and Canny/Depth (control_image) are different models: pass one of them")
    encode = lambda pixels: ae.encode(pixels.to(ae.device, ae.dtype)).float().cpu()  # noqa: E731
    conds = []
    with torch.inference_mode():
        if mask is not None:
            check_image_size(image.shape[2], image.shape[1])
            conds.append(fill_cond(encode(masked_image(_signed(image), mask.float())), mask.float()))
        if control_image is not None:
            conds.append(control_cond(encode(_signed(resize_images(control_image, width, height)))))
        if reference_images:
            refs = [resize_images(r, *kontext_size(r.shape[2], r.shape[1])) if kontext_resize else r for r in reference_images]
            for r in refs:
                check_image_size(r.shape[2], r.shape[1])
            conds.append(kontext_cond([encode(_signed(r)) for r in refs]))
    return combine(conds)


def combine(conds: list[ImageCond]) -> ImageCond | None:
    """One conditioning holding the parts of several (e.g. Fill channels and Kontext tokens; prepared() judges)."""
    return ImageCond(**{k: v for c in conds for k, v in vars(c).items() if v is not None}) if conds else None


def _signed(images: Tensor) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    return images[..., :3].permute(0, 3, 1, 2).float() * 2 - 1
