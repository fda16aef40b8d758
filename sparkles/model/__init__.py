"""The model: vision towers (`vision`), connectors and the vision-language model that splices image embeddings into
the LM's input with one mask (`model`), and checkpoint folders, the embedded default and the SparklesChat-7B import
(`checkpoint`). The peers' variants (adapters, cross-attention, tiles) belong here too.

May import: the data model and rendering (`config`, `errors`, `registry`, `tokenizer`, `processor`). Never training,
evaluation, the world or a front end.
"""
