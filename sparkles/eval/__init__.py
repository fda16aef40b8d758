"""Evaluation: the resumable, sharded, batched harness (`harness`) and `sparkles eval` (`cli`), who answers
(`responders`: a local model, an endpoint, the references), the LLM judge (`judge`), summaries and HTML
(`report`), and the tasks in the original's layouts (`tasks/`: SparklesEval, BISON, NLVR2).

May import: the data model, rendering, the model and inference. Never training, synthesis or the world: the shapes
benchmark registers itself in `tasks.LOADERS` from `world/benchmark.py`.
"""
