"""Front ends over the network: the OpenAI-compatible HTTP server (`server`) and the Gradio web UI (`webui`), both
on the continuous-batching engine.

May import: anything below, and `cli` for loading a model as the command line does. Nothing imports them.
"""
