"""Scoring: how good are an output's depth, normals and masks against ground truth.

Nothing here runs a job: these modules read an output (or any table with vb_batch map
columns) and a truth table, and compute the numbers papers report. The run's own modules
(config, pipeline, engines, io, models, codecs) live beside this package and never import it.

==============  ===========================================================================
module          what it holds
==============  ===========================================================================
scoring         `vb-batch eval`: pairs prediction and truth rows, applies the protocol, the
                metrics table (``_metrics.parquet``), trivial baselines, the text rendering
metrics         the formulas: depth (Marigold), normals (DSINE), segmentation confusion
                matrix with cityscapesScripts' iIoU and category IoU; per-image accumulators
protocols       each benchmark's crops, depth range, alignment (and its max resolution),
                averaging
truth           ``--truth-format``: the field's encodings of truth (KITTI, NYU, DIODE masks,
                Cityscapes labelIds and instanceIds, ADE20K, DSINE normals)
confidence      does the stored confidence rank the errors: sparsification, AUSE on the
                uncertainty papers' 50-step grid, threshold tables
scenes          procedural rooms with exact truth (depth, normals, classes, instances): the
                demo's data and the demo model's training data
examples        small benchmark-shaped truth tables built from scenes, in each benchmark's
                own encoding
==============  ===========================================================================

The old import paths (``vb_batch.evaluate``, ``vb_batch.metrics``, ``vb_batch.protocols``,
``vb_batch.truth``, ``vb_batch.confidence_eval``, ``vb_batch.examples``, ``vb_batch.scenes``)
re-export these modules' names.

Example:
    >>> from vb_batch.evaluation.scoring import evaluate, render_metrics
    >>> metrics = evaluate("out/")            # doctest: +SKIP
    >>> print(render_metrics(metrics))        # doctest: +SKIP
"""
