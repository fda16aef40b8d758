"""SparklesDialogue synthesis: the original's prompts (`prompts`), parsing and checks (`parse`), the records of a
teacher call (`calls`), the runner with its rate limit and resumable order (`run`), the template teacher
(`template`), the append-only store (`store`), statistics and viewer (`report`), and `sparkles synth` (`cli`).

May import: the data model and the OpenAI-compatible client only. No torch.
"""
