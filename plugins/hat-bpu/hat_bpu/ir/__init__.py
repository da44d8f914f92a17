"""The integer IR: the graph (:mod:`.graph`), the ``.hbir`` file,
the fast simulator (``int_infer``) and the literal int64 reference executor."""
