"""The SimCLR training recipe built on the library: datasets (data), encoders and heads (models),
LARS and the schedule (optim), the run configuration and per-dataset recipes (recipes), the trainer
(train), checkpoint IO (checkpoint), run logging (metrics), the probes (evaluate) and the command line
(cli, `python -m simclr_ext` / `simclr-ext`).

Nothing here is imported by `import simclr_ext`: the library (ops, losses, augmentations) stays free of
the trainer, the datasets and their optional dependencies. `simclr_ext.PretrainConfig`, `pretrain`,
`linear_eval` and `knn_eval` load this package on first use; everything else is imported from its
module, e.g. `from simclr_ext.recipe.checkpoint import load_encoder`.
"""
