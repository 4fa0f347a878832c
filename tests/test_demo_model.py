"""The shipped demo generalist, loaded like a user's checkpoint and run through the whole pipeline.

The metric floors are the point: a broken codec, resize or channel order anywhere between the
painting and the stored column drops a number below them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import vb_batch
from vb_batch import scenes
from vb_batch.cli import main
from vb_batch.codecs import segmentation as seg_codec
from vb_batch.config import ConfigError
from vb_batch.evaluate import evaluate, metrics_json
from vb_batch.models.demo_generalist import SHIPPED_MODEL, VBDemoPipeline, load_demo_pipeline, parse_prompt
from vb_batch.tasks import get_task, legend_text

ROWS = 6
# The shipped model on held-out scenes, with margin for so few rows (full evaluation: README).
FLOORS = {"delta1": 0.75, "normals_mean_deg": 24.0, "miou": 0.5}


@pytest.fixture(scope="module")
def scene_table(tmp_path_factory):
    return scenes.write_scene_table(tmp_path_factory.mktemp("scenes") / "scenes.parquet", ROWS)


@pytest.fixture(scope="module")
def pipe():
    return load_demo_pipeline(str(SHIPPED_MODEL))


def test_shipped_weights_are_small_safetensors():
    files = [p for p in SHIPPED_MODEL.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert json.loads((SHIPPED_MODEL / "model_index.json").read_text())["_class_name"] == "VBDemoPipeline"


def test_the_prompt_picks_the_task():
    legend = scenes.scene_legend()
    assert parse_prompt(get_task("depth").default_template).task == "depth"
    assert parse_prompt(get_task("normals").default_template).task == "normals"
    request = parse_prompt(get_task("segmentation").default_template.format(legend=legend_text(legend)))
    assert request.task == "segmentation" and request.legend == tuple(legend.to_pairs())
    request = parse_prompt(get_task("referring").default_template.format(phrase="the red boxes"))
    assert request.task == "referring" and request.phrase == "the red boxes"
    with pytest.raises(ValueError, match="cannot tell the task"):
        parse_prompt("Make it look like a watercolour.")


@pytest.mark.slow  # ~2-4 s
def test_legend_colours_come_from_the_prompt(pipe):
    image = scenes.render_scene(scenes.HELD_OUT_SEED_START).rgb
    names = list(scenes.SCENE_CLASSES)
    first = seg_codec.Legend.from_names(names)
    second = seg_codec.Legend.from_pairs([(n, (40 * i + 20, 200 - 30 * i, 90)) for i, n in enumerate(reversed(names))])
    prompts = [get_task("segmentation").default_template.format(legend=legend_text(lg)) for lg in (first, second)]
    paintings = pipe(image=[image, image], prompt=prompts, output_type="uint8").images
    assert not np.array_equal(paintings[0], paintings[1])
    ids = [seg_codec.decode(p, lg).values for p, lg in zip(paintings, (first, second))]
    by_name = [np.array([names.index(lg.names[i]) if i < len(lg) else -1 for i in range(256)])[v] for v, lg in
               zip(ids, (first, second))]
    np.testing.assert_array_equal(by_name[0], by_name[1])  # same classes, painted in the asked colours
    # A legend without "sky" paints sky black: "anything else".
    partial = seg_codec.Legend.from_pairs([("floor", (255, 0, 0)), ("wall", (0, 255, 0))])
    painting = pipe(image=[image], prompt=[get_task("segmentation").default_template.format(legend=legend_text(partial))],
                    output_type="uint8").images[0]
    # Colours are the legend's, moved toward the runner-up class where the model is unsure (its confidence):
    # every pixel decodes to a legend class or to "anything else".
    decoded = seg_codec.decode(painting, partial).values
    assert set(np.unique(decoded)) <= {0, 1, partial.unlabelled}
    assert (decoded[scenes.render_scene(scenes.HELD_OUT_SEED_START).class_ids == scenes.FLOOR] == 0).mean() > 0.9


# The fast path (bf16 weights, codecs decoded in the model worker) must keep the floors too.
@pytest.mark.slow  # ~1.5 s each
@pytest.mark.parametrize("dtype, decode_on_device", [("float32", False), ("bfloat16", True)])
def test_job_with_the_demo_backend_meets_the_metric_floors(scene_table, tmp_path, dtype, decode_on_device):
    # A job's own legend (order and colours unlike the truth's): classes are matched by name.
    legend = {"sky": [30, 60, 200], "box": [200, 30, 30], "floor": [90, 90, 20], "sphere": [20, 200, 20],
              "wall": [200, 200, 200], "cylinder": [250, 120, 0]}
    summary = vb_batch.annotate({
        "input": {"path": str(scene_table), "image_column": "image"},
        "output": {"path": str(tmp_path / "out"), "mode": "overwrite", "report": False},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"legend": legend},
        "model": {"backend": "demo", "device": "cpu", "batch_size": 4, "dtype": dtype,
                  "decode_on_device": decode_on_device},
        "run": {"progress": False},
    })
    assert summary.success and summary.rows_ok == ROWS, summary.render()
    methods = metrics_json(evaluate(str(tmp_path / "out")))["methods"]
    model = methods["model"]
    assert model["depth"]["delta1"] >= FLOORS["delta1"], model
    assert model["normals"]["mean_deg"] <= FLOORS["normals_mean_deg"], model
    assert model["segmentation"]["miou"] >= FLOORS["miou"], model
    assert model["depth"]["delta1"] > methods["const median depth"]["depth"]["delta1"]
    assert model["normals"]["mean_deg"] < methods["const mean normal"]["normals"]["mean_deg"]
    assert model["segmentation"]["miou"] > methods["majority class"]["segmentation"]["miou"]


@pytest.mark.slow  # ~1.5 s
def test_referring_paints_the_named_class(pipe):
    scene = scenes.render_scene(scenes.HELD_OUT_SEED_START + 1)
    painting = pipe(image=[scene.rgb], prompt=[get_task("referring").default_template.format(phrase="the floor")],
                    output_type="uint8").images[0]
    mask = (painting == 255).all(-1)
    floor = scene.class_ids == scenes.FLOOR
    assert (mask & floor).sum() / (mask | floor).sum() > 0.8


def test_demo_command_writes_outputs_metrics_and_report(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--rows", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 ok, 0 failed" in printed and "segmentation miou" in printed and "majority class" in printed
    for name in ("_SUCCESS", "_report.html", "_metrics.parquet"):
        assert (tmp_path / "out" / name).exists()


def test_a_checkpoint_of_another_kind_is_a_config_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MarigoldDepthPipeline"}))
    with pytest.raises(ConfigError, match="not a VBDemoPipeline"):
        load_demo_pipeline(str(tmp_path))
    with pytest.raises(ConfigError, match="model.path"):
        load_demo_pipeline(str(tmp_path / "missing"))
    assert isinstance(load_demo_pipeline(str(SHIPPED_MODEL)), VBDemoPipeline)
