"""What each hosted model takes and answers, in one table; requests sized for it; answers mapped back; tokens priced.

`MODEL_LIMITS` (by model id prefix, the longest match wins) says per model: the
largest inline request, the image encodings it accepts, the sizes it answers at
(a fixed set of aspect ratios for Gemini image models and gpt-image-1, any
16-px grid size within 1:3..3:1 for gpt-image-2), how it counts tokens and
what they cost. Sources (checked 2026; vendors change them, so every price is
also a config key, `model.token_prices`):

    Gemini API (ai.google.dev; google-genai 3.6 `ImageConfig`): inline requests up to 20 MB;
      PNG, JPEG, WebP; gemini-2.5-flash-image answers in ten aspect ratios at about 1 MP
      (1:1 1024x1024 ... 21:9 1536x672), 1290 output tokens an image; input images of up to
      384 px a side count 258 tokens, larger ones 258 per 768x768 tile; $0.30 per 1M input,
      $30 per 1M output tokens; the Batch API at half price. gemini-3-pro-image: the same
      ratios at 1K / 2K / 4K (`image_config.image_size`), 1120 output tokens (2000 at 4K),
      $2 / $120 per 1M, thought tokens billed as text output at $12 (unverified).
    OpenAI (openai 3.63 `images.edit`): input files under 50 MB, PNG, WebP, JPEG;
      gpt-image-1 answers at 1024x1024, 1536x1024 or 1024x1536; gpt-image-2 at any
      WIDTHxHEIGHT on a 16-px grid within 1:3..3:1; `usage` reports input (text, image) and
      output tokens; gpt-image-1 $10 per 1M image input, $40 per 1M output tokens,
      4160 / 6240 output tokens for a high-quality square / 3:2 image (unverified).

A request is sized for its model before it is sent (`fit_request`): an image
is resized to the size the model answers at (never over the inline limit), and
where the model has a fixed set of aspect ratios the nearest one is asked for
and the image padded to it (black bands, centred), never stretched. The answer
is cropped back to the image's own box (`crop_answer`) and the decode stage
maps it to the input's size, so boundaries stay where the model put them. How
a row was fitted goes into the answer column's field metadata (`vb.model_fit`).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vb_batch.errors import RowError

# Room left in an inline request for the prompt, the JSON around the image and the headers.
REQUEST_OVERHEAD_BYTES = 64 << 10
GEMINI_RATIOS_1K = {  # aspect -> (width, height) at 1K (gemini-2.5-flash-image's table)
    "1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
    "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672),
}


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens: input (text and image), output (image), thoughts (billed as text output)."""

    input: float = 0.0
    output: float = 0.0
    thoughts: float | None = None  # None: at the output price

    def cost(self, usage: dict[str, int], discount: float = 1.0) -> float:
        thoughts = self.output if self.thoughts is None else self.thoughts
        total = (usage.get("input_tokens", 0) * self.input + usage.get("output_tokens", 0) * self.output
                 + usage.get("thought_tokens", 0) * thoughts)
        return round(total * discount / 1e6, 8)


@dataclass(frozen=True)
class ModelLimits:
    """What one hosted model takes and answers; see the module docstring for the sources."""

    model: str  # the model id prefix this entry is for ("" : any model of the backend)
    inline_bytes: int  # the largest request (Gemini) or image file (OpenAI) sent inline
    encodings: tuple[str, ...] = ("png", "jpeg")  # what the model accepts, the first preferred
    ratios: dict[str, tuple[int, int]] = field(default_factory=dict)  # aspect -> (width, height) answered
    grid: int = 0  # any size on this grid (gpt-image-2); 0: only `ratios`, or the input's own size
    max_aspect: float = 0.0  # with `grid`: the most elongated size asked for
    working_pixels: int = 0  # with `grid`: the area asked for; 0 (no ratios, no grid): the input's size
    image_tokens: str = ""  # how an input image is counted: "gemini-tiles", "openai-tiles", "" (unknown)
    output_tokens: int | None = None  # tokens an answer image is billed as (None: unknown before the run)
    prices: Prices | None = None  # None: unknown (set model.token_prices)
    batch_discount: float = 1.0  # the price factor of the vendor's Batch API

    def input_image_tokens(self, width: int, height: int) -> int | None:
        """The tokens one input image of this size is billed as, by the vendor's documented rule."""
        if self.image_tokens == "gemini-tiles":  # <= 384 px a side: 258; else 258 per 768x768 tile
            if max(width, height) <= 384:
                return 258
            return 258 * math.ceil(width / 768) * math.ceil(height / 768)
        if self.image_tokens == "openai-tiles":  # within 2048, short side 768, then 170 per 512 tile + 85
            scale = min(1.0, 2048 / max(width, height))
            width, height = width * scale, height * scale
            scale = min(1.0, 768 / min(width, height))
            width, height = width * scale, height * scale
            return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)
        return None


GEMINI_DEFAULT = ModelLimits("", inline_bytes=20_000_000, encodings=("png", "jpeg", "webp"))
OPENAI_DEFAULT = ModelLimits("", inline_bytes=50_000_000, encodings=("png", "jpeg", "webp"))

# The one table: backend -> entries by model id prefix (the longest matching prefix wins).
MODEL_LIMITS: dict[str, tuple[ModelLimits, ...]] = {
    "gemini": (
        GEMINI_DEFAULT,
        ModelLimits("gemini-2.5-flash-image", inline_bytes=20_000_000, encodings=("png", "jpeg", "webp"),
                    ratios=GEMINI_RATIOS_1K, image_tokens="gemini-tiles", output_tokens=1290,
                    prices=Prices(input=0.30, output=30.0), batch_discount=0.5),
        ModelLimits("gemini-3-pro-image", inline_bytes=20_000_000, encodings=("png", "jpeg", "webp"),
                    ratios=GEMINI_RATIOS_1K, image_tokens="gemini-tiles", output_tokens=1120,
                    prices=Prices(input=2.0, output=120.0, thoughts=12.0), batch_discount=0.5),
    ),
    "openai": (
        OPENAI_DEFAULT,
        ModelLimits("gpt-image-1", inline_bytes=50_000_000, encodings=("png", "jpeg", "webp"),
                    ratios={"1:1": (1024, 1024), "3:2": (1536, 1024), "2:3": (1024, 1536)},
                    image_tokens="openai-tiles", output_tokens=4160, prices=Prices(input=10.0, output=40.0)),
        ModelLimits("gpt-image-2", inline_bytes=50_000_000, encodings=("png", "jpeg", "webp"), grid=16,
                    max_aspect=3.0, working_pixels=1024 * 1024, image_tokens="openai-tiles"),
    ),
}
# gemini-3-pro-image at 2K / 4K (`image_config.image_size`): the 1K sizes times this, billed at these tokens.
GEMINI_IMAGE_SIZES = {"1K": (1, None), "2K": (2, None), "4K": (4, 2000)}
# gpt-image-1's output tokens by quality for a square answer; a 3:2 one is billed 1.5x.
OPENAI_QUALITY_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "auto": 4160}


def limits_for(backend: str, model_name: str | None) -> ModelLimits:
    """The table's entry for `model_name` (the longest matching prefix), or the backend's default."""
    entries = MODEL_LIMITS.get(backend, (GEMINI_DEFAULT,))
    matches = [e for e in entries if (model_name or "").startswith(e.model)]
    return max(matches, key=lambda e: len(e.model)) if matches else entries[0]


# ---------------------------------------------------------------------------- fitting a request


@dataclass(frozen=True)
class Fit:
    """How a row's image was fitted into what was sent: the canvas, the image's box in it, the aspect asked for."""

    canvas: tuple[int, int]  # (height, width) sent
    box: tuple[int, int, int, int]  # (top, left, height, width) of the image inside the canvas
    aspect: str | None = None  # the aspect ratio asked for ("21:9"); None: the model takes any size

    @property
    def padded(self) -> bool:
        return self.box[2:] != self.canvas


def nearest_ratio(ratios: dict[str, tuple[int, int]], height: int, width: int) -> str:
    """The aspect in `ratios` nearest to height x width, in log aspect (ties: the first in the table)."""
    aspect = math.log(width / height)
    return min(ratios, key=lambda name: abs(math.log(ratios[name][0] / ratios[name][1]) - aspect))


def canvas_for(limits: ModelLimits, height: int, width: int, scale: int = 1,
               aspect: str | None = None) -> tuple[tuple[int, int], str | None]:
    """((height, width) to send, aspect name to ask for) for an image of this size under `limits`."""
    if limits.ratios:
        name = aspect if aspect in limits.ratios else nearest_ratio(limits.ratios, height, width)
        w, h = limits.ratios[name]
        return (h * scale, w * scale), name
    if limits.grid:
        ratio = min(max(width / height, 1 / limits.max_aspect), limits.max_aspect)
        g = limits.grid
        w = max(g, round(math.sqrt(limits.working_pixels * ratio) / g) * g)
        h = max(g, round(math.sqrt(limits.working_pixels / ratio) / g) * g)
        return (h, w), f"{w}x{h}"
    return (height, width), None


def fit_request(image: np.ndarray, limits: ModelLimits, scale: int = 1, aspect: str | None = None
                ) -> tuple[np.ndarray, Fit]:
    """The image to send (resized to the model's size, padded to its aspect ratio) and how it was fitted."""
    height, width = image.shape[:2]
    (ch, cw), name = canvas_for(limits, height, width, scale, aspect)
    if (ch, cw) == (height, width):
        return image, Fit((height, width), (0, 0, height, width), name)
    factor = min(ch / height, cw / width)
    bh, bw = min(ch, max(1, round(height * factor))), min(cw, max(1, round(width * factor)))
    resized = np.asarray(Image.fromarray(image).resize((bw, bh), Image.Resampling.LANCZOS))
    top, left = (ch - bh) // 2, (cw - bw) // 2
    canvas = np.zeros((ch, cw, 3), np.uint8)
    canvas[top:top + bh, left:left + bw] = resized
    return canvas, Fit((ch, cw), (top, left, bh, bw), name)


def crop_answer(answer: np.ndarray, fit: Fit) -> np.ndarray:
    """The part of an answer that covers the row's image (the padding cut off), at the answer's own scale."""
    if not fit.padded:
        return answer
    ah, aw = answer.shape[:2]
    ch, cw = fit.canvas
    top, left, bh, bw = fit.box
    y0, x0 = round(top * ah / ch), round(left * aw / cw)
    y1, x1 = round((top + bh) * ah / ch), round((left + bw) * aw / cw)
    return answer[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]


def encode_request(image: np.ndarray, limits: ModelLimits, text_bytes: int = 0) -> tuple[bytes, str]:
    """(bytes, MIME type) of the image as sent: PNG when the request fits the inline limit, else JPEG, else smaller.

    The limit is on the request (Gemini: 20 MB with the image as base64 and the prompt); a
    request that would exceed it is never sent: the image is re-encoded, then downscaled.
    """
    budget = limits.inline_bytes - REQUEST_OVERHEAD_BYTES - text_bytes
    while True:
        for fmt, options in (("png", {"compress_level": 1}), ("jpeg", {"quality": 95}), ("jpeg", {"quality": 85})):
            if fmt not in limits.encodings:
                continue
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format=fmt.upper(), **options)
            data = buf.getvalue()
            if base64_length(len(data)) <= budget:
                return data, f"image/{fmt}"
        height, width = image.shape[:2]
        if height * width <= 64 * 64:
            raise RowError("image_too_large", f"a {width}x{height} image cannot be sent within "
                           f"{limits.inline_bytes} bytes")
        image = np.asarray(Image.fromarray(image).resize((max(1, width * 3 // 4), max(1, height * 3 // 4)),
                                                         Image.Resampling.LANCZOS))


def base64_length(raw: int) -> int:
    return 4 * math.ceil(raw / 3)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------- usage and cost


USAGE_FIELDS = ("input_tokens", "output_tokens", "thought_tokens")


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """`total` with `usage` added (tokens, and cost where both know it)."""
    for name in USAGE_FIELDS:
        total[name] = total.get(name, 0) + int(usage.get(name) or 0)
    if "cost" in usage:
        total["cost"] = None if usage["cost"] is None or total.get("cost", 0.0) is None else \
            round(total.get("cost", 0.0) + usage["cost"], 8)
    return total


def prices_of(cfg, limits: ModelLimits) -> Prices | None:
    """`model.token_prices` over the table's prices; None when neither knows them."""
    given = getattr(cfg, "token_prices", None) or {}
    if not given and limits.prices is None:
        return None
    base = limits.prices or Prices()
    return Prices(input=given.get("input", base.input), output=given.get("output", base.output),
                  thoughts=given.get("thoughts", base.thoughts))
