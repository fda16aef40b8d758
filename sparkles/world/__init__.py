"""The shapes world, with exact answers: scenes and their captions (`shapes`), BISON-style, NLVR2-style, caption
and dialogue items (`tasks`), endless training streams and the world tokenizer (`data`), the exactly scored
benchmark (`benchmark`) and `sparkles demo` (`demo`).

May import: everything below the front ends, including training records and the evaluation tasks whose prompts
and extractor it mirrors. Nothing below imports the world: it registers its streams, tokenizer and benchmark in
`train.records.STREAMS`, `tokenizer.NAMED` and `eval.tasks.LOADERS`.
"""
