"""vb_batch inside other people's pipelines: the user-facing integrations, each importing its framework lazily.

    ray_data.py  Annotator: a callable class for Ray Data's `Dataset.map_batches` (was `vb_batch.ray`)
    spark.py     annotate(df, config): a Spark DataFrame in, the same DataFrame with labels out
                 (was `vb_batch.spark`)
    torch.py     LabelDataset, collate_labels: a vb_batch output as a torch `Dataset` for training
                 (was `vb_batch.readers`)

The integrations that run the model (Ray Data, Spark) run the stages through
the one per-batch loop, `vb_batch.pipeline.loop`. For a whole job with resume
and atomic commits, run a job with `engine.kind: ray` or `spark` instead.
"""
