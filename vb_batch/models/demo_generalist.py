"""The built-in demo generalist: one small image-to-image network, the task chosen by the prompt.

It is trained only on `vb_batch.scenes` (procedural rooms; `scripts/train_demo_model.py`), in the
spirit of the Vision Banana recipe: one generator, a prompt that selects the task, and every
answer painted as RGB through the codecs, which the normal pipeline decodes. It knows nothing of
real photographs; annotate real archives with a real checkpoint.

    VBDemoNet       ModelMixin + ConfigMixin: a compact U-Net trunk shared by all tasks and a
                    head modulated (FiLM) by a learned task embedding. Channels of its output:
                    depth: log metres and a "far" logit; normals: a 3-vector; segmentation:
                    one logit per class it knows (`class_names`).
    VBDemoPipeline  a `diffusers.DiffusionPipeline`: reads each prompt, runs the net, paints.
    DemoBackend     `model.backend: demo`; loads a saved pipeline from `model.path`
                    (default: the weights shipped in `vb_batch/demo_model/`).

How a prompt is read (`parse_prompt`): a legend "name = (r, g, b), ..." makes it segmentation,
and the net's class logits are painted with the colours the *prompt* gives, by class name
(classes missing from the legend, and legend names the net does not know, paint black:
"anything else"); "Segment X. Paint X white ..." is referring segmentation of the class named
in X; otherwise "normal" selects normals and "depth" selects depth. Depth is painted with
`vb_batch.codecs.depth.encode` on the vision-banana preset (far = white), normals with
`vb_batch.codecs.normals.encode` in the OpenGL frame: exactly what the decoders invert.

Example (a job config):

    model:
      backend: demo                  # path defaults to the shipped weights
      profile: vision-banana         # metric depth
    segmentation:
      classes: [floor, wall, box, sphere, cylinder, sky]
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

from vb_batch.codecs import depth as depth_codec
from vb_batch.codecs import normals as normals_codec
from vb_batch.config import ConfigError
from vb_batch.models.base import ModelBackend
from vb_batch.models.options import DemoOptions
from vb_batch.models.preflight import checkpoint_checks
from vb_batch.models.loading import (
    from_pretrained, load_error, local_only, quiet_loading, resolve_device, to_device,
)

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
TASKS = ("depth", "normals", "segmentation")
# Legend entries: "name = (r, g, b)"; a name runs back to the previous separator.
LEGEND_ENTRY = re.compile(r"([^,:;=()]+?)\s*=\s*\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)")
REFERRING = re.compile(r"segment\s+(.+?)\.\s*paint\b", re.IGNORECASE)
# Other words people use for the classes of the demo scenes.
SYNONYMS = {"ground": "floor", "cube": "box", "ball": "sphere", "column": "cylinder", "pillar": "cylinder"}
# Names of "anything else" in a legend: the colour is painted where the net sees no legend class.
BACKGROUND_NAMES = {"anything else", "background", "other", "unlabelled", "void"}


# ---------------------------------------------------------------------------- the network


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class VBDemoNet(ModelMixin, ConfigMixin):
    """Compact U-Net with a task-conditioned head (see the module docstring).

    Input: RGB in [0, 1], (B, 3, H, W) with H and W multiples of 2**(len(channels) - 1); two
    normalised coordinate channels are appended inside, so the net knows where in the frame a
    pixel is (the horizon and the floor's perspective carry the metric scale).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        class_names: tuple[str, ...] = ("floor", "wall", "box", "sphere", "cylinder", "sky"),
        channels: tuple[int, ...] = (16, 32, 64, 128, 192),
        head_channels: int = 32,
        task_dim: int = 32,
        trained_size: tuple[int, int] = (96, 128),
    ):
        super().__init__()
        self.encoders = nn.ModuleList()
        cin = 5
        for c in channels:
            self.encoders.append(_conv_block(cin, c))
            cin = c
        # The bottleneck also sees the whole image at once (global average), for the scene's scale.
        self.context = nn.Sequential(nn.Linear(channels[-1], channels[-1]), nn.ReLU(inplace=True))
        self.decoders = nn.ModuleList()
        for skip, c in zip(reversed(channels[:-1]), reversed(channels[1:])):
            self.decoders.append(_conv_block(c + skip, skip))
        self.task_embedding = nn.Embedding(len(TASKS), task_dim)
        self.film = nn.Linear(task_dim, 2 * head_channels)
        self.head_conv = nn.Conv2d(channels[0], head_channels, 3, padding=1)
        self.head_out = nn.Conv2d(head_channels, self.out_channels, 1)

    @property
    def out_channels(self) -> int:
        return max(len(self.config.class_names), 3)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Task-independent features (B, channels[0], H, W) of RGB images in [0, 1]."""
        b, _, h, w = images.shape
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"VBDemoNet: image size {h}x{w} must be a multiple of {self.multiple}")
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([(images - 0.5) * 4.0, ys, xs], dim=1)
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = x + self.context(x.mean(dim=(2, 3)))[:, :, None, None]
        for decoder, skip in zip(self.decoders, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = decoder(torch.cat([x, skip], dim=1))
        return x

    def head(self, features: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """The task's raw output (B, out_channels, H, W); `task_index` (B,) indexes `TASKS`."""
        scale, shift = self.film(self.task_embedding(task_index)).chunk(2, dim=1)
        hidden = self.head_conv(features) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.head_out(F.relu(hidden))

    def forward(self, images: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images), task_index)


def depth_from_output(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log depth in metres, far logit), each (B, H, W), from the net's raw depth output."""
    return output[:, 0], output[:, 1]


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Request:
    """What a prompt asks for: the task, and the legend (segmentation) or the phrase (referring)."""

    task: str
    legend: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    phrase: str | None = None


def parse_prompt(prompt: str) -> Request:
    """Read the task (and legend or phrase) from a prompt; ValueError if it asks for nothing known."""
    entries = LEGEND_ENTRY.findall(prompt)
    if entries:
        legend = tuple((name.strip(), (int(r), int(g), int(b))) for name, r, g, b in entries)
        too_bright = [name for name, rgb in legend if max(rgb) > 255]
        if too_bright:
            raise ValueError(f"prompt legend: colours of {too_bright} are outside 0..255")
        return Request("segmentation", legend=legend)
    referring = REFERRING.search(prompt)
    if referring:
        return Request("referring", phrase=referring.group(1).strip())
    text = prompt.lower()
    if "normal" in text:
        return Request("normals")
    if "depth" in text:
        return Request("depth")
    raise ValueError(
        f"the demo model cannot tell the task from the prompt {prompt[:80]!r}: it paints depth, surface normals, "
        "segmentation with a legend 'name = (r, g, b), ...', or referring 'Segment X. Paint X white ...'"
    )


def class_index(name: str, class_names: tuple[str, ...]) -> int | None:
    """The net's class for a legend name or phrase ("the boxes" -> box), or None."""
    words = re.sub(r"[^a-z ]", " ", name.lower()).split()
    known = {n: i for i, n in enumerate(class_names)}
    for word in reversed(words):  # the head noun comes last: "the red boxes"
        for candidate in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
            candidate = SYNONYMS.get(candidate, candidate)
            if candidate in known:
                return known[candidate]
    return None


# ---------------------------------------------------------------------------- the pipeline


@dataclass
class VBDemoPipelineOutput(BaseOutput):
    """`images`: the paintings, (N, H, W, 3) float in [0, 1] ("np"), PIL images ("pil") or uint8 ("uint8")."""

    images: np.ndarray | list[Image.Image]


class VBDemoPipeline(DiffusionPipeline):
    """Image + prompt -> painted answer (see the module docstring).

    Example:
        >>> pipe = VBDemoPipeline.from_pretrained("vb_batch/demo_model", use_safetensors=True)  # doctest: +SKIP
        >>> out = pipe(image=[rgb], prompt=["Estimate the metric depth of this image."])      # doctest: +SKIP
        >>> out.images[0].shape                                                               # doctest: +SKIP
        (96, 128, 3)
    """

    model_cpu_offload_seq = "net"

    def __init__(self, net: VBDemoNet):
        super().__init__()
        self.register_modules(net=net)

    def working_size(self, height: int, width: int, resolution: int | None = None) -> tuple[int, int]:
        """(h, w) the net runs at: the input's aspect, the trained area (or resolution**2), sides multiples of 16."""
        area = resolution**2 if resolution else math.prod(self.net.config.trained_size)
        scale = math.sqrt(area / (height * width))
        multiple = self.net.multiple
        return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))

    @torch.no_grad()
    def __call__(
        self,
        image: list[np.ndarray | Image.Image],
        prompt: list[str] | str,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> VBDemoPipelineOutput | tuple:
        # 1. Check inputs.
        images = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im) for im in image]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"VBDemoPipeline: {len(images)} images but {len(prompts)} prompts")
        if output_type not in ("np", "pil", "uint8"):
            raise ValueError(f"VBDemoPipeline: output_type must be 'np', 'pil' or 'uint8', got {output_type!r}")
        requests = [parse_prompt(p) for p in prompts]
        if not images:
            return VBDemoPipelineOutput(images=[]) if return_dict else ([],)
        if height is None or width is None:
            height, width = self.working_size(*images[0].shape[:2])

        # 2. Prepare: every image at the working size, RGB in [0, 1].
        resized = [
            im if im.shape[:2] == (height, width) else np.asarray(Image.fromarray(im).resize((width, height), Image.BICUBIC))
            for im in images
        ]
        pixels = to_device(np.stack(resized), self.device).permute(0, 3, 1, 2).to(torch.float32) / 255.0

        # 3. Run the trunk once and the head once per task asked for, on the image and on its mirror:
        #    where the two answers disagree the net is unsure, and it paints that (see `paint`).
        features = self.net.trunk(pixels.to(self.net.dtype))
        mirrored = self.net.trunk(pixels.flip(-1).to(self.net.dtype))
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_task["segmentation" if request.task == "referring" else request.task].append(i)
        paintings = np.zeros((len(images), height, width, 3), dtype=np.uint8)
        for task, index in by_task.items():
            task_index = torch.full((len(index),), TASKS.index(task), device=self.device, dtype=torch.long)
            output = self.net.head(features[index], task_index).float()
            second = self.net.head(mirrored[index], task_index).float().flip(-1)
            if task == "normals":
                second[:, 0] = -second[:, 0]  # mirrored image: x of every normal flips
            for row, i in enumerate(index):
                paintings[i] = self.paint(output[row : row + 1], requests[i], second[row : row + 1])

        # 4. Return.
        if output_type == "pil":
            result = [Image.fromarray(p) for p in paintings]
        elif output_type == "np":
            result = paintings.astype(np.float32) / 255.0
        else:
            result = paintings
        self.maybe_free_model_hooks()
        return VBDemoPipelineOutput(images=result) if return_dict else (result,)

    def paint(self, output: torch.Tensor, request: Request, second: torch.Tensor | None = None) -> np.ndarray:
        """One image's raw net output (1, C, H, W) -> its painting (H, W, 3) uint8 through the codecs.

        The values come from `output`. `second` (the answer for the mirrored image, mirrored back)
        says how sure they are, and the painting carries it the way the codecs read confidence:
        depth is pushed off the colour walk across the edge it lies on (`unsure_depth_colours`,
        so it decodes to the same depth with a lower confidence), normals are painted shorter
        than unit length (cosine of the angle between the two answers), and a class colour is
        moved toward the runner-up class's colour by its share of the two probabilities, never so
        far that another legend colour becomes the nearest.
        """
        if request.task == "depth":
            depth_m = _depth_m(output)[0].cpu().numpy()
            if second is None:
                return depth_codec.encode(depth_m, preset="vision-banana")
            other = _depth_m(second)[0].cpu().numpy()
            with np.errstate(invalid="ignore"):
                disagreement = np.abs(np.log(depth_m) - np.log(other))
            # One answer far and the other not: as unsure as it gets; both far: sure (white).
            disagreement = np.where(np.isfinite(disagreement), disagreement, np.inf)
            push = np.where(np.isinf(depth_m) & np.isinf(other), 0.0,
                            np.minimum(disagreement * DEPTH_PUSH_PER_LOG, DEPTH_PUSH_MAX))
            return unsure_depth_colours(depth_m, push)
        if request.task == "normals":
            if second is None:
                return normals_codec.encode(output[0, :3].permute(1, 2, 0).cpu().numpy(), frame="opengl")
            first = F.normalize(output[0, :3], dim=0)
            cosine = (first * F.normalize(second[0, :3], dim=0)).sum(0).clamp(MIN_PAINTED_NORM, 1.0)
            m = (first * cosine).permute(1, 2, 0).cpu().numpy().astype(np.float64)
            return np.rint((m + 1.0) / 2.0 * 255.0).astype(np.uint8)  # the normals codec's colours, unnormalised
        class_names = tuple(self.net.config.class_names)
        logits = output[0, : len(class_names)]
        ids = logits.argmax(dim=0).cpu().numpy()
        # Colour of each net class (row len(class_names) = "anything else"); black unless asked for.
        palette = np.zeros((len(class_names) + 1, 3), dtype=np.uint8)
        if request.task == "referring":
            target = class_index(request.phrase or "", class_names)
            if target is not None:
                palette[target] = 255
        else:
            for name, rgb in request.legend:
                if name.strip().lower() in BACKGROUND_NAMES:
                    continue
                target = class_index(name, class_names)
                if target is not None:
                    palette[target] = rgb
        if second is None or request.task == "referring":  # a referring mask stays two-coloured
            return palette[ids]
        probs = ((logits.softmax(0) + second[0, : len(class_names)].softmax(0)) / 2).cpu().numpy()
        first_p = np.take_along_axis(probs, ids[None], 0)[0]
        np.put_along_axis(probs, ids[None], -1.0, 0)
        runner_up = probs.argmax(0)
        runner_p = probs.max(0)
        share = runner_p / np.maximum(first_p + runner_p, 1e-12)
        colours = palette.astype(np.float64)
        step = colours[runner_up] - colours[ids]
        # Move at most MAX_MOVE of the way to the nearest *other* colour, so the nearest legend colour
        # (what the codec decodes) stays the first class's: its values do not change, its confidence does.
        gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
        nearest_other = np.where(gaps > 0, gaps, np.inf).min(axis=1)
        length = np.linalg.norm(step, axis=-1)
        limit = MAX_MOVE * np.where(np.isfinite(nearest_other), nearest_other, 0.0)[ids]
        move = np.minimum(share * length, limit)
        mixed = colours[ids] + np.divide(move, length, out=np.zeros_like(move), where=length > 0)[..., None] * step
        return np.rint(mixed).astype(np.uint8)


# How far (8-bit levels) a depth colour is pushed off the walk per unit of |ln d1 - ln d2| between the
# two answers, and at most: 10% disagreement = 8 levels = the codec's confidence_sigma (confidence 0.61).
DEPTH_PUSH_PER_LOG = 80.0
DEPTH_PUSH_MAX = 60.0
CORNER_MARGIN = 0.9
MIN_PAINTED_NORM = 0.2  # twice the normals codec's MIN_NORM: still a direction
MAX_MOVE = 0.4  # of the distance to the nearest other colour: under one half, so the first class stays nearest


def _depth_m(output: torch.Tensor) -> torch.Tensor:
    log_depth, far_logit = depth_from_output(output)
    return torch.exp(log_depth.clamp(max=10.0)).where(far_logit <= 0, torch.inf)


def unsure_depth_colours(depth_m: np.ndarray, push: np.ndarray, preset: str = "vision-banana") -> np.ndarray:
    """Walk colours of `depth_m` moved `push` 8-bit levels off the walk, across the edge each lies on.

    The move is perpendicular to the edge and toward the middle of the RGB cube, so the nearest
    point of the walk (what `depth_codec.decode` reads) is still the painted depth while the
    distance to the walk (what its confidence reads) is `push`.
    """
    walk = depth_codec.get_preset(preset)
    vertices = np.asarray(walk.vertices) * 255.0
    f = depth_codec.squash(np.clip(depth_m, 0.0, None), walk)
    position = walk.num_edges * f
    edge = np.clip(np.floor(position), 0, walk.num_edges - 1).astype(np.intp)
    rgb = depth_codec.encode(depth_m, walk).astype(np.float64)
    along = vertices[edge + 1] - vertices[edge]
    edge_length = np.linalg.norm(along, axis=-1)
    along /= edge_length[..., None]
    # Near a corner of the walk a long push would land nearer the next edge (a different depth):
    # push at most as far as the corner is along the edge (times sqrt 2, the corners are square).
    to_corner = np.minimum(position - edge, 1.0 - (position - edge)) * edge_length
    push = np.minimum(push, CORNER_MARGIN * np.sqrt(2.0) * to_corner)
    inward = 127.5 - rgb
    inward -= np.sum(inward * along, axis=-1, keepdims=True) * along
    norm = np.linalg.norm(inward, axis=-1, keepdims=True)
    inward = np.divide(inward, norm, out=np.zeros_like(inward), where=norm > 0)
    return np.clip(np.rint(rgb + push[..., None] * inward), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- the backend


def load_demo_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VBDemoPipeline:
    """Load a saved `VBDemoPipeline` (safetensors only): its net class is this module's, never one named by the files."""
    quiet_loading()
    offline = local_only(path, "model.path")
    try:
        index = DiffusionPipeline.load_config(path, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise load_error("model.path", path, exc, offline) from exc
    if index.get("_class_name") != VBDemoPipeline.__name__:
        raise ConfigError(
            f"model.path: {path!r} holds a {index.get('_class_name')}, not a VBDemoPipeline; "
            "the demo backend runs only the demo generalist (use model.backend: diffusers or marigold)"
        )
    net = from_pretrained(VBDemoNet, path, "model.path", subfolder="net", dtype=dtype)
    pipe = from_pretrained(VBDemoPipeline, path, "model.path", net=net)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class DemoBackend(ModelBackend):
    """`model.backend: demo`: the demo generalist, from `model.path` or the shipped weights."""

    name = "demo"
    default_profile = "vision-banana"  # it paints metric depth on the vision-banana walk
    options_model = DemoOptions

    @classmethod
    def working_resolution(cls, cfg):
        return cfg.processing_resolution or None  # None: the net's own working size

    @classmethod
    def preflight(cls, cfg, *, local):
        return checkpoint_checks(cfg, local=local)

    def __init__(self, cfg):
        super().__init__(cfg)  # checks the options' problems (one model.path)
        self.path = cfg.path or str(SHIPPED_MODEL)
        self.device = resolve_device(cfg.device)
        self.pipe = load_demo_pipeline(self.path, self.device, getattr(torch, cfg.dtype))
        self.resolution = cfg.processing_resolution

    def batch_key(self, image: np.ndarray) -> tuple[int, int]:
        return self.pipe.working_size(image.shape[0], image.shape[1], self.resolution)

    def predict(self, images, prompts, task, seeds):
        # The net is deterministic: `seeds` have nothing to sample. Images of one working size share a call.
        answers: list[np.ndarray | None] = [None] * len(images)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            buckets[self.batch_key(image)].append(i)
        for (height, width), index in buckets.items():
            out = self.pipe(
                image=[images[i] for i in index], prompt=[prompts[i] for i in index],
                height=height, width=width, output_type="uint8",
            ).images
            for i, painting in zip(index, out):
                answers[i] = painting
        return answers

