"""The scene generator's truth is geometry: depth, normals and the camera must agree with each other."""

from __future__ import annotations

import numpy as np
import pytest

import vb_batch
from vb_batch.codecs import normals as normals_codec
from vb_batch.evaluation import scenes

SEEDS = [scenes.HELD_OUT_SEED_START + i for i in range(4)]


@pytest.fixture(scope="module", params=SEEDS)
def scene(request):
    return scenes.render_scene(request.param)


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)))


def test_deterministic_from_the_seed():
    a, b = scenes.render_scene(7), scenes.render_scene(7)
    for field in ("rgb", "depth_m", "normals", "class_ids", "instance_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.rgb, scenes.render_scene(8).rgb)


def test_sky_is_far_without_normal_and_everything_else_is_a_surface(scene):
    sky = scene.class_ids == scenes.SKY
    assert np.array_equal(sky, np.isposinf(scene.depth_m))
    assert np.array_equal(sky, scene.instance_ids == 0)
    assert np.isnan(scene.normals[sky]).all()
    surface = scene.normals[~sky]
    np.testing.assert_allclose(np.linalg.norm(surface, axis=-1), 1.0, atol=1e-5)
    assert (scene.depth_m[~sky] > 0.5).all()
    # Every normal faces the camera: in the OpenCV frame it points against the viewing ray.
    rays = scene.camera.ray_directions()[~sky]
    assert (np.sum(normals_codec.convert(surface, "opengl", "opencv") * rays, axis=-1) < 0).all()


def test_planes_through_back_projected_depth_match_the_normals(scene):
    """Back-project each planar surface with the intrinsics, fit a plane, compare with its normals."""
    points = scene.camera.backproject(scene.depth_m)  # OpenCV frame
    for instance in range(1, 5):  # floor and the three walls
        mask = scene.instance_ids == instance
        if mask.sum() < 20:
            continue
        p = points[mask]
        centre = p.mean(axis=0)
        _, singular, vt = np.linalg.svd(p - centre, full_matrices=False)
        assert singular[2] / np.sqrt(mask.sum()) < 1e-4  # rms distance to the plane, metres
        fitted = vt[2] if vt[2] @ centre < 0 else -vt[2]  # the side facing the camera
        truth = scene.normals[mask]
        assert angles_deg(normals_codec.convert(fitted, "opencv", "opengl")[None], truth).max() < 0.01
        if instance == 1:  # the floor lies camera-height below the camera
            assert abs(abs(fitted @ centre) - scene.camera_height_m) < 1e-4


def test_finite_differences_of_depth_give_the_normals(scene):
    """Normals from neighbouring back-projected pixels equal the truth on flat faces, nearly on curved ones."""
    points = scene.camera.backproject(np.where(np.isfinite(scene.depth_m), scene.depth_m, 0.0))  # sky: not scored
    right = points[:-1, 1:] - points[:-1, :-1]
    down = points[1:, :-1] - points[:-1, :-1]
    # Facing the camera in OpenCV (z forward) is cross(down, right); then to the painted OpenGL frame.
    estimated = normals_codec.convert(np.cross(down, right), "opencv", "opengl")
    ids = scene.instance_ids
    same = (ids[:-1, :-1] == ids[:-1, 1:]) & (ids[:-1, :-1] == ids[1:, :-1]) & (ids[:-1, :-1] > 0)
    truth = scene.normals[:-1, :-1][same]
    error = angles_deg(estimated[same], truth)
    flat = np.isin(scene.class_ids[:-1, :-1][same], [scenes.FLOOR, scenes.WALL, scenes.BOX])
    # Across a crease (a box edge, a cylinder's rim) one pixel's normal says nothing of its neighbours'.
    bend = np.maximum(angles_deg(truth, scene.normals[:-1, 1:][same]), angles_deg(truth, scene.normals[1:, :-1][same]))
    assert error[flat & (bend == 0)].max() < 0.05
    smooth = bend < 5.0  # curved faces: the difference normal is one of a point near the three pixels
    assert np.all(error[smooth] < 2.0 * bend[smooth] + 0.05)
    assert smooth.mean() > 0.85  # most of the picture


def test_truth_table_reads_back_through_load_arrays(tmp_path):
    seeds = SEEDS[:2]
    for encoding in ("array", "png"):
        table = scenes.scene_table(seeds, encoding=encoding)
        assert table.column("id").to_pylist() == [scenes.scene_id(s) for s in seeds]
        depth = vb_batch.load_arrays(table, "gt_depth")
        normals = vb_batch.load_arrays(table, "gt_normals")
        classes = vb_batch.load_arrays(table, "gt_segmentation")
        for i, seed in enumerate(seeds):
            scene = scenes.render_scene(seed)
            sky = np.isposinf(scene.depth_m)
            assert np.isposinf(depth[i][sky]).all()
            tolerance = 0 if encoding == "array" else 0.5 / 256  # KITTI PNG: metres * 256
            np.testing.assert_allclose(depth[i][~sky], scene.depth_m[~sky], atol=tolerance, rtol=0)
            np.testing.assert_allclose(normals[i][~sky], scene.normals[~sky], atol=0 if encoding == "array" else 0.01)
            np.testing.assert_array_equal(classes[i], scene.class_ids)
        meta = table.schema.field("gt_segmentation").metadata
        assert meta[b"vb.role"] == b"truth"
        assert [name for name, _ in scenes.scene_legend().to_pairs()] == list(scenes.SCENE_CLASSES)
    path = scenes.write_scene_table(tmp_path / "s.parquet", 2)
    assert vb_batch.load_arrays(str(path), "gt_instances")[0].max() >= 5  # objects have their own instances
