"""The shapes world, with exact answers: scenes and their captions (`shapes`), the exact scorer and its readers of
claims, captions and verdicts (`scoring`), BISON-style, NLVR2-style, caption and dialogue items (`tasks`), their
worked answers (`worked`), the datasets on disk (`sets`), endless
training streams, the world tokenizer and the evaluator used during training (`data`), tower pretraining on the
world's object labels (`perception`), the exactly scored benchmark (`benchmark`) and `sparkles demo` (`demo`).

May import: everything below the front ends, including training records and the evaluation tasks whose prompts
and extractor it mirrors. Nothing below imports the world: it registers its streams, tokenizer, benchmark,
evaluator and perception stage in `train.records.STREAMS`, `tokenizer.NAMED`, `eval.tasks.LOADERS`,
`train.evaluators.EVALUATORS` and `train.stages.STAGE_KINDS`.
"""
