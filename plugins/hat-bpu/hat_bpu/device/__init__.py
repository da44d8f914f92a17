"""The modelled device: march table, model checker, perf model, ``.hbm`` compiler and runtime,
NV12 board input, and the ``hat check`` / ``hat perf`` commands."""
