"""Procedural scenes with exact ground truth: RGB plus metric depth, normals, classes and instances.

A scene is a small open-top room seen by a pinhole camera: a textured floor,
three walls, sky above the walls, and a few boxes (turned about the vertical),
spheres and upright cylinders standing on the floor. Every pixel is ray-cast
analytically through its centre, so the truth is exact, not estimated:

    depth_m       float32 (H, W), z-depth in metres along the optical axis; +inf for sky
    normals       float32 (H, W, 3), unit normals in the OpenGL camera frame (the normals
                  codec's painted frame: x right, y up, z toward the viewer); NaN for sky
    class_ids     uint8 (H, W), index into `SCENE_CLASSES`
    instance_ids  uint8 (H, W), 0 = sky, 1 = floor, 2..4 = walls, 5.. = objects

The image is shaded with a sun (Lambert, cast shadows from every object and
wall), an ambient term and a little specular, with procedural solid textures
(checkers, stripes, blotches) in colours drawn independently of the class, so
shape, not colour, says what a thing is. Everything is deterministic from the
seed. Pixel (row i, column j) has its centre at (u, v) = (j + 0.5, i + 0.5), and
a point at depth z seen there sits at ``x = (u - cx) / fx * z``, ``y = (v - cy) / fy * z``
in the OpenCV camera frame (`Camera.backproject`).

`scene_table` writes scenes as an image table with the truth as map columns in
the same storage encodings (and `vb.*` field metadata) as vb_batch's outputs, so
`vb_batch.load_arrays(table, "gt_depth")` reads the truth exactly as it reads a
prediction, and `vb-batch eval` finds it by its ``vb.role = truth`` metadata.

Seeds: `TRAIN_SEED_START` onwards are what the demo model was trained on;
`HELD_OUT_SEED_START` onwards are never trained on (evaluation and the demo).

The scenes live in `vb_batch.evaluation` because they are truth-bearing data for scoring (the
benchmark-shaped tables of `vb_batch.evaluation.examples`, the demo's metrics), not a step of a
run: no run module imports them.

Example:
    >>> from vb_batch.evaluation import scenes
    >>> scene = scenes.render_scene(1_000_000)
    >>> scene.rgb.shape, scene.depth_m.dtype, scenes.SCENE_CLASSES[scene.class_ids[-1, 64]]
    ((96, 128, 3), dtype('float32'), 'floor')
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from vb_batch.codecs import segmentation as seg_codec
from vb_batch.io.encodings import (
    ColumnMeta,
    depth_png_params,
    encode_map,
    png_bytes,
    storage_type,
)

SCENE_CLASSES = ("floor", "wall", "box", "sphere", "cylinder", "sky")
FLOOR, WALL, BOX, SPHERE, CYLINDER, SKY = range(len(SCENE_CLASSES))
DEFAULT_SIZE = (96, 128)  # (height, width): what the demo model was trained on
TRAIN_SEED_START = 0
HELD_OUT_SEED_START = 1_000_000
TRUTH_PREFIX = "gt_"
# Rays must travel this far (metres) before a hit counts (a hit behind or at the origin is none).
EPSILON_M = 1e-6


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: image size and intrinsics in pixels (OpenCV convention, pixel centres at +0.5)."""

    height: int
    width: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def from_fov(cls, height: int, width: int, horizontal_fov_deg: float) -> Camera:
        fx = width / (2.0 * math.tan(math.radians(horizontal_fov_deg) / 2.0))
        return cls(height, width, fx, fx, width / 2.0, height / 2.0)

    def ray_directions(self) -> np.ndarray:
        """(H, W, 3) ray through each pixel centre in the OpenCV frame, scaled so that z = 1."""
        v, u = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64) + 0.5
        return np.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy, np.ones_like(u)], axis=-1)

    def backproject(self, depth_m: np.ndarray) -> np.ndarray:
        """(H, W) z-depth -> (H, W, 3) points in the OpenCV camera frame (metres)."""
        return self.ray_directions() * np.asarray(depth_m, dtype=np.float64)[..., None]


@dataclass
class Scene:
    """One rendered scene and its exact truth (see the module docstring for units and frames)."""

    seed: int
    camera: Camera
    rgb: np.ndarray
    depth_m: np.ndarray
    normals: np.ndarray
    class_ids: np.ndarray
    instance_ids: np.ndarray
    camera_height_m: float
    pitch_deg: float


def scene_legend() -> seg_codec.Legend:
    """The scene classes coloured from the default palette (what `segmentation.classes` gives)."""
    return seg_codec.Legend.from_names(list(SCENE_CLASSES))


# ---------------------------------------------------------------------------- ray casting


def _valid(t: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(t) & (t > EPSILON_M), t, np.inf)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1)


# Every intersector takes ray origins (N, 3) (or one (1, 3) shared by all rays) and directions
# (N, 3), and returns the ray parameter t of the nearest hit in front (inf: missed) and the world
# normal there. Camera rays share the camera's origin; shadow rays start at their own points.


def _plane(origins, dirs, normal, offset):
    """Plane n.p = offset."""
    normal = np.asarray(normal, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset - origins @ normal) / (dirs @ normal)
    return _valid(t), np.broadcast_to(normal, dirs.shape)


def _sphere(origins, dirs, centre, radius):
    oc = origins - centre
    a = _dot(dirs, dirs)
    b = 2.0 * _dot(dirs, oc)
    c = _dot(oc, oc) - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = _valid(np.where(disc >= 0, (-b - np.sqrt(disc)) / (2 * a), np.inf))
    with np.errstate(invalid="ignore"):
        normal = (origins + t[:, None] * dirs - centre) / radius
    return t, normal


def _cylinder(origins, dirs, base, radius, height):
    """Upright cylinder standing on the floor at `base` (x, 0, z): side and top cap."""
    ox, oz = origins[:, 0] - base[0], origins[:, 2] - base[2]
    dx, dz = dirs[:, 0], dirs[:, 2]
    a = dx * dx + dz * dz
    b = 2.0 * (dx * ox + dz * oz)
    c = ox * ox + oz * oz - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = np.where((disc >= 0) & (a > 0), (-b - np.sqrt(disc)) / (2 * a), np.inf)
        y_side = origins[:, 1] + t_side * dirs[:, 1]
        t_side = _valid(np.where((y_side >= 0) & (y_side <= height), t_side, np.inf))
        t_top, _ = _plane(origins, dirs, (0.0, 1.0, 0.0), height)
        top_point = origins + t_top[:, None] * dirs
        side_point = origins + t_side[:, None] * dirs
    inside_top = (top_point[:, 0] - base[0]) ** 2 + (top_point[:, 2] - base[2]) ** 2 <= radius**2
    t_top = np.where(inside_top, t_top, np.inf)
    side_normal = np.stack([side_point[:, 0] - base[0], np.zeros_like(t_side), side_point[:, 2] - base[2]], axis=1)
    top = t_top < t_side
    normal = np.where(top[:, None], np.array([0.0, 1.0, 0.0]), side_normal / radius)
    return np.where(top, t_top, t_side), normal


def _box(origins, dirs, centre, half, yaw):
    """Box with half extents `half`, turned by `yaw` about the vertical: slab test in its own frame."""
    c, s = math.cos(yaw), math.sin(yaw)
    to_local = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # rows: the box's axes in the world
    o = (origins - centre) @ to_local.T
    d = dirs @ to_local.T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = 1.0 / np.where(d == 0, 1e-300, d)
        t1 = (-half - o) * inv
        t2 = (half - o) * inv
    near = np.minimum(t1, t2)
    axis = np.argmax(near, axis=1)
    t_near = near.max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    t = _valid(np.where(t_near <= t_far, t_near, np.inf))
    local_normal = np.zeros_like(d)
    rows = np.arange(len(d))
    local_normal[rows, axis] = -np.sign(d[rows, axis])
    return t, local_normal @ to_local


# ---------------------------------------------------------------------------- the scene


@dataclass
class _Surface:
    cls: int
    instance: int
    intersect: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    colours: np.ndarray  # (2, 3) linear albedo, mixed by the texture
    texture: tuple  # (kind, frequency, axes, phases)
    shininess: float


def _random_texture(rng: np.random.Generator, frequency: tuple[float, float]) -> tuple:
    kind = rng.choice(["plain", "checker", "stripes", "blotches"], p=[0.2, 0.3, 0.25, 0.25])
    axes = rng.normal(size=(3, 3))
    return str(kind), rng.uniform(*frequency), axes / np.linalg.norm(axes, axis=1, keepdims=True), rng.uniform(0, 6.3, 3)


def _texture(points: np.ndarray, texture: tuple) -> np.ndarray:
    """Weight in [0, 1] of the surface's second colour at world `points` (solid textures)."""
    kind, frequency, axes, phases = texture
    if kind == "plain":
        return np.zeros(len(points))
    if kind == "checker":
        # Off the lattice by a quarter cell, so that faces lying on cell boundaries do not flicker.
        cells = np.floor(points * frequency + 0.25).astype(np.int64)
        return (cells.sum(axis=1) % 2).astype(np.float64)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sign(np.sin(points @ axes[0] * frequency * 2 * np.pi + phases[0]))
    waves = sum(np.sin(points @ axes[k] * frequency * (k + 1.3) + phases[k]) for k in range(3))
    return np.clip(0.5 + 0.3 * waves, 0.0, 1.0)


def _random_colours(rng: np.random.Generator, contrast: float) -> np.ndarray:
    base = rng.uniform(0.08, 0.85, 3)
    other = np.clip(base * rng.uniform(1 - contrast, 1 + contrast, 3) + rng.normal(0, 0.05, 3), 0.02, 0.95)
    return np.stack([base, other])


def _room(rng: np.random.Generator, left: float, right: float, back: float, wall_height: float) -> list[_Surface]:
    """Floor and three walls (left, right, back) that end at `wall_height`; above them is sky."""
    surfaces = [
        _Surface(FLOOR, 1, lambda o, d: _plane(o, d, (0.0, 1.0, 0.0), 0.0),
                 _random_colours(rng, 0.5), _random_texture(rng, (1.0, 2.5)), 0.1),
    ]
    colours, texture = _random_colours(rng, 0.35), _random_texture(rng, (0.5, 2.0))
    planes = [((1.0, 0.0, 0.0), left), ((-1.0, 0.0, 0.0), -right), ((0.0, 0.0, -1.0), -back)]
    for k, (normal, offset) in enumerate(planes):

        def wall(o, d, normal=normal, offset=offset):
            t, n = _plane(o, d, normal, offset)
            with np.errstate(invalid="ignore"):
                below_top = o[:, 1] + t * d[:, 1] <= wall_height
            return np.where(below_top, t, np.inf), n

        surfaces.append(_Surface(WALL, 2 + k, wall, colours, texture, 0.05))
    return surfaces


def _objects(rng: np.random.Generator, left: float, right: float, back: float) -> list[_Surface]:
    """3-8 boxes, spheres and cylinders standing on the floor, at least ~1.8 m in front of the camera."""
    surfaces = []
    for instance in range(5, 5 + int(rng.integers(3, 9))):
        kind = int(rng.choice([BOX, SPHERE, CYLINDER]))
        size = rng.uniform(0.25, 0.8)
        x = rng.uniform(left + size, right - size)
        z = rng.uniform(1.8 + size, back - size)
        if kind == BOX:
            half = np.array([size, size * rng.uniform(0.4, 1.6), size * rng.uniform(0.5, 1.5)])
            centre, yaw = np.array([x, half[1], z]), rng.uniform(0, math.pi / 2)
            intersect = functools.partial(_box, centre=centre, half=half, yaw=yaw)
        elif kind == SPHERE:
            intersect = functools.partial(_sphere, centre=np.array([x, size, z]), radius=size)
        else:
            height, radius = size * rng.uniform(1.0, 3.5), size * rng.uniform(0.4, 0.9)
            intersect = functools.partial(_cylinder, base=np.array([x, 0.0, z]), radius=radius, height=height)
        surfaces.append(_Surface(kind, instance, intersect, _random_colours(rng, 0.6),
                                 _random_texture(rng, (1.5, 6.0)), rng.uniform(0.0, 0.6)))
    return surfaces


def _cast(origins: np.ndarray, dirs: np.ndarray, surfaces: list[_Surface]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit per ray: t (inf: nothing), world normal, index into `surfaces` (-1: nothing)."""
    best_t = np.full(len(dirs), np.inf)
    best_normal = np.full(dirs.shape, np.nan)
    best_surface = np.full(len(dirs), -1)
    for index, surface in enumerate(surfaces):
        t, normal = surface.intersect(origins, dirs)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        best_normal = np.where(closer[:, None], normal, best_normal)
        best_surface = np.where(closer, index, best_surface)
    return best_t, best_normal, best_surface


def render_scene(seed: int, height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1]) -> Scene:
    """Render the scene of `seed` (deterministic) at (height, width) with its exact truth."""
    rng = np.random.default_rng(seed)
    camera = Camera.from_fov(height, width, rng.uniform(56.0, 64.0))
    left, right = -rng.uniform(2.0, 4.5), rng.uniform(2.0, 4.5)
    back, wall_height = rng.uniform(4.5, 11.0), rng.uniform(1.9, 3.2)
    camera_height = rng.uniform(1.3, 1.7)
    pitch, yaw = math.radians(rng.uniform(-2.0, 14.0)), math.radians(rng.uniform(-12.0, 12.0))
    origin = np.array([[rng.uniform(left + 0.8, right - 0.8), camera_height, 0.0]])
    surfaces = _room(rng, left, right, back, wall_height) + _objects(rng, left, right, back)

    # Camera axes in the world (y up): right, down, forward; camera rays have z = 1, so t is z-depth.
    forward = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right_axis = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    camera_to_world = np.stack([right_axis, np.cross(right_axis, forward), forward], axis=1)
    rays = camera.ray_directions().reshape(-1, 3)
    dirs = rays @ camera_to_world.T
    t, world_normal, surface = _cast(origin, dirs, surfaces)
    hit = surface >= 0

    # Truth. Normals: world -> OpenCV camera (the transpose rotates back), facing the camera, -> OpenGL.
    depth_m = np.where(hit, t, np.inf)
    camera_normal = world_normal @ camera_to_world
    facing = np.where(_dot(camera_normal, rays) > 0, -1.0, 1.0)
    normals = camera_normal * facing[:, None] * np.array([1.0, -1.0, -1.0])
    normals[~hit] = np.nan
    class_of = np.array([s.cls for s in surfaces] + [SKY])
    instance_of = np.array([s.instance for s in surfaces] + [0])
    class_ids, instance_ids = class_of[surface], instance_of[surface]

    rgb = _shade(rng, origin[0], dirs, t, world_normal * facing[:, None], surface, surfaces)
    shape = (height, width)
    return Scene(
        seed=seed, camera=camera, rgb=rgb.reshape(shape + (3,)),
        depth_m=depth_m.reshape(shape).astype(np.float32), normals=normals.reshape(shape + (3,)).astype(np.float32),
        class_ids=class_ids.reshape(shape).astype(np.uint8), instance_ids=instance_ids.reshape(shape).astype(np.uint8),
        camera_height_m=float(camera_height), pitch_deg=math.degrees(pitch),
    )


def _shade(rng, origin, dirs, t, normals, surface, surfaces) -> np.ndarray:
    """Sunlit, textured, shadowed colours of the hits and a sky gradient elsewhere -> (N, 3) uint8."""
    elevation, azimuth = math.radians(rng.uniform(35.0, 70.0)), rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)])
    sun_colour = rng.uniform(0.85, 1.15) * np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95)])
    ambient = rng.uniform(0.25, 0.45) * np.array([rng.uniform(0.8, 0.95), rng.uniform(0.9, 1.0), 1.0])
    horizon, zenith = rng.uniform(0.6, 0.9, 3), np.array([rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.55), rng.uniform(0.7, 0.95)])

    unit_dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    up = np.clip(unit_dirs[:, 1] * 2.5, 0.0, 1.0)[:, None]
    colour = horizon * (1 - up) + zenith * up
    hit = np.flatnonzero(surface >= 0)
    points = origin + t[hit, None] * dirs[hit]
    n = normals[hit]
    starts = points + n * 1e-4
    sun_rays = np.broadcast_to(sun, starts.shape)
    lit = np.ones(len(hit), dtype=bool)
    for s in surfaces:
        if s.cls != FLOOR:  # the floor cannot shadow anything standing on it
            lit &= ~np.isfinite(s.intersect(starts, sun_rays)[0])
    lambert = np.clip(n @ sun, 0.0, None) * lit
    half_vector = sun - unit_dirs[hit]
    half_vector /= np.linalg.norm(half_vector, axis=1, keepdims=True)
    specular = np.clip(_dot(n, half_vector), 0.0, None) ** 40 * lit
    for index in np.unique(surface[hit]):
        s = surfaces[index]
        mine = surface[hit] == index
        mix = _texture(points[mine], s.texture)[:, None]
        albedo = s.colours[0] * (1 - mix) + s.colours[1] * mix
        shaded = albedo * (ambient + sun_colour * lambert[mine, None]) + 0.6 * s.shininess * specular[mine, None]
        colour[hit[mine]] = shaded
    gamma = np.clip(colour, 0.0, 1.0) ** (1 / 2.2) * 255.0
    noise = rng.normal(0.0, 1.5, gamma.shape)
    return np.clip(np.rint(gamma + noise), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- tables


def truth_meta(kind: str, encoding: str) -> ColumnMeta:
    """Field metadata of one truth column ("depth", "normals", "segmentation" or "instances")."""
    role = {"role": "truth"}
    if kind == "depth":
        scale, offset = depth_png_params(False) if encoding == "png" else (None, None)
        return ColumnMeta(kind="depth", encoding=encoding, unit="m", task="depth", scale=scale, offset=offset, extra=role)
    if kind == "normals":
        return ColumnMeta(kind="normals", encoding=encoding, unit="unit vector", task="normals", frame="opengl", extra=role)
    if kind == "segmentation":
        legend = scene_legend()
        return ColumnMeta(kind="classes", encoding=encoding, unit="class id", task="segmentation",
                          legend=legend.to_pairs(), unlabelled=legend.unlabelled, extra=role)
    if kind == "instances":
        return ColumnMeta(kind="classes", encoding=encoding, unit="instance id", task="instances", extra=role)
    raise ValueError(f"truth_meta: unknown kind {kind!r}")


TRUTH_MAPS = ("depth", "normals", "segmentation", "instances")


def scene_id(seed: int) -> str:
    return f"scene-{seed:07d}"


def scene_table(seeds: Sequence[int], size: tuple[int, int] = DEFAULT_SIZE, encoding: str = "array") -> pa.Table:
    """An image table of the scenes of `seeds`: id, image (PNG bytes), truth map columns, intrinsics.

    Truth columns are `gt_depth`, `gt_normals`, `gt_segmentation`, `gt_instances`, in `encoding`
    ("array": exact float32; "png": vb_batch's lossless PNG conventions) with `vb.role = truth`.
    """
    metas = {TRUTH_PREFIX + name: truth_meta(name, encoding) for name in TRUTH_MAPS}
    scalars = ("fx", "fy", "cx", "cy", "camera_height_m", "pitch_deg")
    fields = [pa.field("id", pa.string()), pa.field("image", pa.binary())]
    fields += [pa.field(name, storage_type(encoding), metadata=meta.to_metadata()) for name, meta in metas.items()]
    fields += [pa.field(name, pa.float32()) for name in scalars] + [pa.field("seed", pa.int64())]
    columns: dict[str, list] = {f.name: [] for f in fields}
    for seed in seeds:
        scene = render_scene(int(seed), *size)
        maps = (scene.depth_m, scene.normals, scene.class_ids, scene.instance_ids)
        columns["id"].append(scene_id(int(seed)))
        columns["image"].append(png_bytes(Image.fromarray(scene.rgb)))
        for (name, meta), values in zip(metas.items(), maps):
            columns[name].append(encode_map(values, meta))
        cam = scene.camera
        for name, value in zip(scalars, (cam.fx, cam.fy, cam.cx, cam.cy, scene.camera_height_m, scene.pitch_deg)):
            columns[name].append(value)
        columns["seed"].append(int(seed))
    schema = pa.schema(fields)
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in fields], schema=schema)


def write_scene_table(
    path: str | Path, count: int, start_seed: int = HELD_OUT_SEED_START, size: tuple[int, int] = DEFAULT_SIZE,
    encoding: str = "array",
) -> Path:
    """Render `count` scenes from `start_seed` on and write them as one Parquet file at `path`."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(scene_table(range(start_seed, start_seed + count), size, encoding), path)
    return path
