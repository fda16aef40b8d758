"""Training: records read from files or registered streams (`records`), pixels, rendering, padding and packing per
batch (`data`), the loop with DDP/FSDP2 (`loop`), atomic resumable training state (`resume`), and the presets and
`sparkles train` (`recipes`).

May import: the data model, rendering and the model. Never evaluation, synthesis, the world or a front end: the
shapes world plugs its streams into `records.STREAMS` from its own folder.
"""
