"""The model: vision towers (`vision`), connectors and the vision-language model that splices image embeddings into
the LM's input with one mask (`model`), and checkpoint folders, the embedded default and the SparklesChat-7B import
(`checkpoint`). The peers' switches: multi-modal causal attention (`attention`), sub-image tiles and skip tokens
(`tiles`), mixed towers (`mixed`), ImageBind-LLM's visual cache (`visual_cache`, its command in `visual_cache_cli`),
weight mixing (`merge`), LLaMA-Adapter's / ImageBind-LLM's gated adapters (`adapters`) and Flamingo's gated
cross-attention (`cross_attention`), which share one way of reading images inside the LM (`layer_state`); export
to the Hugging Face LLaVA layout (`export`).

May import: the data model and rendering (`config`, `errors`, `registry`, `tokenizer`, `processor`). Never training,
evaluation, the world or a front end.
"""
